//! A browser for tests and benches: headless Chromium driven through chromedriver (WebDriver),
//! each on a free port, ended with the value.
//!
//! Without `chromedriver`/`chromium`, [`Browser::start`] says the caller is skipped, except
//! under `CI=true` (`.ci/run` installs both), where a missing browser is a failure.
//! Screenshots go to `target/ui-shots/`.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long a page may take to show what the test waits for.
pub const PAGE_WAIT: Duration = Duration::from_secs(20);

/// chromedriver on a free port, and a browser session on it; both end with the value.
pub struct Browser {
    pub client: Client,
    driver: tokio::process::Child,
}

impl Browser {
    /// `None` (with the reason printed) when no browser is installed outside CI.
    pub async fn start() -> Option<Browser> {
        let driver_bin = ["chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
        let Some(driver_bin) = driver_bin else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci,
                "chromedriver is not installed (CI=true): apt-get install chromium chromium-driver"
            );
            eprintln!(
                "SKIPPED: chromedriver/chromium not installed (apt-get install chromium chromium-driver)"
            );
            return None;
        };
        let port = free_port();
        let driver = tokio::process::Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-dev-shm-usage",
                "--window-size=1280,900"]}),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    // chromedriver is still starting: it has no event to wait on.
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no browser session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Some(Browser { client, driver })
    }

    /// Runs `script` (a function body returning JSON) until `pred` holds for its value.
    pub async fn until(&self, what: &str, script: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        let mut last = Value::Null;
        while tokio::time::Instant::now() < deadline {
            if let Ok(v) = self.client.execute(script, vec![]).await {
                if pred(&v) {
                    return v;
                }
                last = v;
            }
            // The page changes on its own (a WebSocket frame): read it again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}; last: {last}");
    }

    /// The element `css` names, once the page has made it (pages render after their first
    /// API answer).
    pub async fn el(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-shots");
        std::fs::create_dir_all(&dir).expect("the screenshot folder");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("the screenshot written");
    }

    pub async fn close(mut self) {
        let _ = self.client.close().await;
        let _ = self.driver.kill().await;
    }
}

/// A free TCP port on loopback (chromedriver binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
