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
    /// The key of the request in flight.
    pending_key: Option<String>,
    /// Renewals done (for tests and logs).
    done: u64,
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
        let due = Instant::now() + Self::delay(&tls);
        Self {
            client,
            files,
            tls,
            due,
            pending_key: None,
            done: 0,
        }
    }

    fn delay(tls: &TlsMaterial) -> Duration {
        match pki::node_cert_facts(&tls.cert_pem, &tls.ca_pem) {
            Ok(f) => delay_until_renewal(f.not_after_ms, now_ms()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the node certificate's expiry; not renewing it");
                Duration::from_secs(365 * 24 * 3600)
            }
        }
    }

    /// When the next request is due.
    pub fn due(&self) -> Instant {
        self.due
    }

    /// The request to send now (a fresh key's CSR); asked again later if no answer comes.
    pub fn request(&mut self) -> Option<wire::NodeMessage> {
        self.due = Instant::now() + ANSWER_WAIT;
        match pki::new_key_and_csr() {
            Ok((key, csr_pem)) => {
                self.pending_key = Some(key);
                tracing::info!("renewing the node certificate");
                Some(wire::NodeMessage {
                    msg: Some(wire::node_message::Msg::Renew(wire::RenewRequest {
                        csr_pem,
                    })),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a key for renewal");
                None
            }
        }
    }

    /// Takes the conductor's answer: the new certificate goes to the files and to the
    /// endpoint, for the next handshakes.
    pub fn answer(&mut self, r: wire::RenewReply) {
        if !r.error.is_empty() {
            tracing::warn!(error = %r.error, "the conductor refused to renew this node's certificate");
            self.due = Instant::now() + RETRY_REFUSED;
            return;
        }
        let Some(key_pem) = self.pending_key.take() else {
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
            tracing::warn!(error = %e, "could not save the renewed certificate; a restart uses the old one");
        }
        self.done += 1;
        self.due = Instant::now() + delay_until_renewal(r.not_after_ms, now_ms());
        tracing::info!(not_after_ms = r.not_after_ms, "node certificate renewed");
        self.tls = tls;
    }

    /// Renewals done so far.
    pub fn renewed(&self) -> u64 {
        self.done
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
