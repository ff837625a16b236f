//! Live certificate renewal: at about two thirds of what is left of the certificate's life
//! (with jitter, so a fleet enrolled together does not renew together), the node sends a CSR
//! for a new key over its control stream; the conductor signs it for the connection's node id,
//! and the node keeps the new key and certificate (files, and the endpoint's next
//! handshakes). The connection, its streams and the workloads are untouched.

use std::sync::Arc;
use std::time::Duration;

use symphony_net::{Client, TlsMaterial, pki};
use tokio::time::Instant;

use super::join::IdentityFiles;
use crate::time::now_ms;
use crate::wire;

/// A request without an answer is sent again after this.
const ANSWER_WAIT: Duration = Duration::from_secs(60);
/// A refused renewal is tried again after this.
const RETRY_REFUSED: Duration = Duration::from_secs(300);

/// The renewal state of one node.
#[derive(Debug)]
pub struct Renewal {
    client: Arc<Client>,
    files: Option<IdentityFiles>,
    tls: TlsMaterial,
    /// When to ask next.
    due: Instant,
    /// End of the certificate in use (Unix ms; 0: unknown).
    not_after_ms: i64,
    /// The key and CSR of the request in flight: a retry sends the same CSR, so a late answer
    /// still matches the key kept.
    pending: Option<(String, String)>,
}

/// When to renew a certificate that ends at `not_after_ms`: after 60-73 % of what is left.
fn delay_until_renewal(not_after_ms: i64, now_ms: i64) -> Duration {
    let left = u64::try_from(not_after_ms.saturating_sub(now_ms)).unwrap_or(0);
    if left == 0 {
        return Duration::from_secs(30);
    }
    let share = rand::random_range(0.60..0.73);
    Duration::from_millis((left as f64 * share) as u64)
}

impl Renewal {
    /// Renews the certificate in `tls` (kept in `files` when given).
    pub fn new(client: Arc<Client>, tls: TlsMaterial, files: Option<IdentityFiles>) -> Self {
        let not_after_ms = Self::not_after(&tls);
        Self {
            client,
            files,
            tls,
            due: Instant::now() + Self::delay(not_after_ms),
            not_after_ms,
            pending: None,
        }
    }

    fn not_after(tls: &TlsMaterial) -> i64 {
        match pki::node_cert_facts(&tls.cert_pem, &tls.ca_pem) {
            Ok(f) => f.not_after_ms,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the node certificate's expiry; not renewing it");
                0
            }
        }
    }

    fn delay(not_after_ms: i64) -> Duration {
        if not_after_ms == 0 {
            return Duration::from_secs(365 * 24 * 3600);
        }
        delay_until_renewal(not_after_ms, now_ms())
    }

    /// When the next request is due.
    pub fn due(&self) -> Instant {
        self.due
    }

    /// Whether the certificate in use has expired (handshakes with it are refused: only a
    /// renewal with the key, over the enrollment ALPN, helps).
    pub fn expired(&self) -> bool {
        self.not_after_ms != 0 && now_ms() >= self.not_after_ms
    }

    /// The TLS material in use.
    pub fn tls(&self) -> &TlsMaterial {
        &self.tls
    }

    /// Asks again after `d` (an offline renewal is under way).
    pub fn postpone(&mut self, d: Duration) {
        self.due = Instant::now() + d;
    }

    /// The request to send now (a CSR for a fresh key, or the one still unanswered); asked
    /// again later if no answer comes.
    pub fn request(&mut self) -> Option<wire::NodeMessage> {
        self.due = Instant::now() + ANSWER_WAIT;
        if self.pending.is_none() {
            match pki::new_key_and_csr() {
                Ok(pair) => self.pending = Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make a key for renewal");
                    return None;
                }
            }
        }
        let (_, csr_pem) = self.pending.clone()?;
        tracing::info!("renewing the node certificate");
        Some(wire::NodeMessage {
            msg: Some(wire::node_message::Msg::Renew(wire::RenewRequest {
                csr_pem,
            })),
        })
    }

    /// Takes the conductor's answer: the new certificate goes to the files and to the
    /// endpoint, for the next handshakes.
    pub fn answer(&mut self, r: wire::RenewReply) {
        if !r.error.is_empty() {
            tracing::warn!(error = %r.error, "the conductor refused to renew this node's certificate");
            self.due = Instant::now() + RETRY_REFUSED;
            return;
        }
        let Some((key_pem, _)) = self.pending.take() else {
            return;
        };
        let tls = TlsMaterial {
            ca_pem: self.tls.ca_pem.clone(),
            cert_pem: r.cert_pem,
            key_pem,
        };
        if let Err(e) = self.client.set_tls(tls.clone()) {
            tracing::warn!(error = %e, "the renewed certificate is unusable; keeping the old one");
            self.due = Instant::now() + RETRY_REFUSED;
            return;
        }
        if let Some(files) = &self.files
            && let Err(e) = files.write(&tls.cert_pem, &tls.key_pem)
        {
            tracing::warn!(error = %format!("{e:#}"), "could not save the renewed certificate; a restart uses the old one");
        }
        self.not_after_ms = r.not_after_ms;
        self.due = Instant::now() + Self::delay(r.not_after_ms);
        tracing::info!(not_after_ms = r.not_after_ms, "node certificate renewed");
        self.tls = tls;
    }

    /// Takes a certificate renewed another way (after expiry, over the enrollment ALPN; the
    /// files are written already).
    pub fn adopt(&mut self, tls: TlsMaterial) {
        if let Err(e) = self.client.set_tls(tls.clone()) {
            tracing::warn!(error = %e, "the renewed certificate is unusable");
            return;
        }
        self.not_after_ms = Self::not_after(&tls);
        self.due = Instant::now() + Self::delay(self.not_after_ms);
        self.pending = None;
        self.tls = tls;
        tracing::info!("node certificate renewed after it expired");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_about_two_thirds_of_what_is_left() {
        let day = 24 * 3600 * 1000;
        for _ in 0..100 {
            let d = delay_until_renewal(day, 0).as_millis();
            assert!(
                d >= (day as u128) * 60 / 100 && d <= (day as u128) * 73 / 100,
                "{d}"
            );
        }
        assert_eq!(delay_until_renewal(5, 10), Duration::from_secs(30));
    }
}
