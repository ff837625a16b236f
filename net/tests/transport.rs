//! Transport tests over loopback: the mTLS matrix, control round trips, migration (NAT
//! rebinding through the impairment proxy, explicit rebind), reconnect after a blackhole, frame
//! limits, and head-of-line freedom of control under a log flood.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use symphony_net::impair::UdpProxy;
use symphony_net::pki::PemPair;
use symphony_net::{
    Accepted, CertificateAuthority, Client, ClientConfig, ClientEvent, CloseCode, Control,
    FrameError, Server, StreamKind, TlsMaterial, TransportSettings, Validity,
};
use tokio_util::sync::CancellationToken;

#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    payload: Vec<u8>,
}

/// A control message without payload.
fn ping(seq: u64) -> Ping {
    Ping {
        seq,
        payload: vec![],
    }
}

struct Pki {
    ca: CertificateAuthority,
    server: PemPair,
}

impl Pki {
    fn new() -> Self {
        let ca = CertificateAuthority::generate(Validity::days(1)).unwrap();
        let server = ca
            .issue_server(&["127.0.0.1".into()], Validity::days(1))
            .unwrap();
        Self { ca, server }
    }

    fn server_tls(&self) -> TlsMaterial {
        TlsMaterial {
            ca_pem: self.ca.cert_pem().to_owned(),
            cert_pem: self.server.cert_pem.clone(),
            key_pem: self.server.key_pem.clone(),
        }
    }

    fn node_tls(&self, id: &str) -> TlsMaterial {
        let pair = self.ca.issue_node(id, Validity::days(1)).unwrap();
        TlsMaterial {
            ca_pem: self.ca.cert_pem().to_owned(),
            cert_pem: pair.cert_pem,
            key_pem: pair.key_pem,
        }
    }
}

fn fast() -> TransportSettings {
    TransportSettings {
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(1500),
        path_poll_interval: Duration::from_millis(20),
        ..TransportSettings::default()
    }
}

fn server(pki: &Pki, settings: TransportSettings) -> (Server, SocketAddr) {
    let s = Server::bind("127.0.0.1:0".parse().unwrap(), &pki.server_tls(), settings).unwrap();
    let addr = s.local_addr().unwrap();
    (s, addr)
}

fn client_cfg(addr: SocketAddr, tls: TlsMaterial, settings: TransportSettings) -> ClientConfig {
    let mut cfg = ClientConfig::new(addr.to_string(), tls);
    cfg.server_name = Some("localhost".into());
    cfg.settings = settings;
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(200);
    cfg
}

/// Connects one node and returns both ends (the node writes first so the server sees the
/// control stream).
async fn pair(
    server: &mut Server,
    cfg: ClientConfig,
) -> (Client, symphony_net::Session, Control, Accepted) {
    let client = Client::new(cfg).unwrap();
    let (session, mut control) = client.connect().await.unwrap();
    control.tx.send(&ping(0)).await.unwrap();
    let accepted = server.accept().await.unwrap();
    (client, session, control, accepted)
}

/// Waits until a refused connection shows up in the server's counter.
async fn wait_refused(server: &Server, before: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server
        .stats()
        .handshake_failures
        .load(std::sync::atomic::Ordering::Relaxed)
        == before
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never refused the handshake"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A node running its reconnect loop (`Client::run`); the loop ends when this is dropped.
struct Running {
    client: Arc<Client>,
    events: tokio::sync::mpsc::Receiver<ClientEvent>,
    cancel: CancellationToken,
}

impl Running {
    fn start(cfg: ClientConfig) -> Self {
        let client = Arc::new(Client::new(cfg).unwrap());
        let cancel = CancellationToken::new();
        let (events, _task) = client.clone().run(cancel.clone());
        Self {
            client,
            events,
            cancel,
        }
    }

    /// Waits for the next connection, says hello on its control stream (`seq`) so the
    /// conductor sees it, and returns both ends.
    async fn connect(
        &mut self,
        srv: &mut Server,
        seq: u64,
    ) -> (symphony_net::Session, Control, Accepted) {
        let ev = self.events.recv().await;
        let Some(ClientEvent::Connected {
            session,
            mut control,
        }) = ev
        else {
            panic!("no connection: {ev:?}")
        };
        control.tx.send(&ping(seq)).await.unwrap();
        (session, control, srv.accept().await.unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test]
async fn good_certificate_is_accepted_with_its_identity() {
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, fast());
    let (_c, _s, _ctl, mut acc) = pair(
        &mut srv,
        client_cfg(addr, pki.node_tls("gpu-node-1"), fast()),
    )
    .await;
    assert_eq!(acc.identity.node_id, "gpu-node-1");
    let first: Ping = acc.control.rx.recv().await.unwrap().unwrap();
    assert_eq!(first.seq, 0);
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let (srv, addr) = server(&pki, fast());
    // The node trusts the right CA but presents a certificate from another one.
    let mut tls = other.node_tls("intruder");
    tls.ca_pem = pki.ca.cert_pem().to_owned();
    let client = Client::new(client_cfg(addr, tls, fast())).unwrap();
    let res = client.connect().await;
    if let Ok((session, mut control)) = res {
        // TLS 1.3: the client may finish first; the server then closes the connection.
        let _ = control.tx.send(&ping(1)).await;
        let _ = session.closed().await;
    }
    wait_refused(&srv, 0).await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let pki = Pki::new();
    let (srv, addr) = server(&pki, fast());
    let past = Validity {
        not_before: rcgen::date_time_ymd(2020, 1, 1),
        not_after: rcgen::date_time_ymd(2021, 1, 1),
    };
    let pair = pki.ca.issue_node("old-node", past).unwrap();
    let tls = TlsMaterial {
        ca_pem: pki.ca.cert_pem().to_owned(),
        cert_pem: pair.cert_pem,
        key_pem: pair.key_pem,
    };
    let client = Client::new(client_cfg(addr, tls, fast())).unwrap();
    if let Ok((session, mut control)) = client.connect().await {
        let _ = control.tx.send(&ping(1)).await;
        let _ = session.closed().await;
    }
    wait_refused(&srv, 0).await;
}

#[tokio::test]
async fn missing_client_certificate_is_refused() {
    let pki = Pki::new();
    let (srv, addr) = server(&pki, fast());
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![symphony_net::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    if let Ok(conn) = ep.connect(addr, "localhost").unwrap().await {
        if let Ok((mut send, _)) = conn.open_bi().await {
            let _ = send.write_all(b"hello").await;
        }
        let _ = conn.closed().await;
    }
    wait_refused(&srv, 0).await;
}

#[tokio::test]
async fn server_name_mismatch_is_refused_by_the_node() {
    let pki = Pki::new();
    let (_srv, addr) = server(&pki, fast());
    let mut cfg = client_cfg(addr, pki.node_tls("n1"), fast());
    cfg.server_name = Some("not-the-conductor.example".into());
    let client = Client::new(cfg).unwrap();
    let Err(err) = client.connect().await else {
        panic!("a wrong server name must fail")
    };
    assert!(
        err.to_string().contains("handshake") || err.to_string().contains("certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn dialling_by_ip_works_when_the_ip_is_in_the_certificate() {
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, fast());
    let mut cfg = client_cfg(addr, pki.node_tls("n-ip"), fast());
    cfg.server_name = None; // host part of 127.0.0.1:port
    let (_c, _s, _ctl, acc) = pair(&mut srv, cfg).await;
    assert_eq!(acc.identity.node_id, "n-ip");
}

#[tokio::test]
async fn oversized_frames_are_refused_without_panic() {
    let pki = Pki::new();
    let small = TransportSettings {
        max_frame_size: 1024,
        ..fast()
    };
    let big = TransportSettings {
        max_frame_size: 1 << 20,
        ..fast()
    };
    let (mut srv, addr) = server(&pki, small.clone());
    // The node is configured with a larger limit than the conductor accepts.
    let (_client, node, mut control, mut acc) =
        pair(&mut srv, client_cfg(addr, pki.node_tls("n"), big)).await;
    let _: Ping = acc.control.rx.recv().await.unwrap().unwrap();
    control
        .tx
        .send(&Ping {
            seq: 1,
            payload: vec![7; 4096],
        })
        .await
        .unwrap();
    let err = acc.control.rx.recv::<Ping>().await.unwrap_err();
    assert!(
        matches!(err, FrameError::TooLarge { max: 1024, .. }),
        "{err}"
    );
    // The layer above closes with a typed code; the node learns why.
    acc.session
        .close(CloseCode::FrameTooLarge, "frame too large");
    let (code, _) = node.closed().await;
    assert_eq!(code, Some(CloseCode::FrameTooLarge));
    // And the writer refuses frames above its own limit before sending anything.
    let err = acc
        .control
        .tx
        .send(&Ping {
            seq: 2,
            payload: vec![0; 2048],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { .. }));
}

#[tokio::test]
async fn close_codes_reach_the_node() {
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, fast());
    let mut cfg = client_cfg(addr, pki.node_tls("n"), fast());
    cfg.backoff_max = Duration::from_millis(100); // "slowly" means backoff_max
    let mut node = Running::start(cfg);
    let (_, _control, acc) = node.connect(&mut srv, 0).await;
    // Refused: reported, then retried at the slowest backoff (workloads keep running).
    acc.session.close(CloseCode::AuthFailed, "revoked");
    match node.events.recv().await {
        Some(ClientEvent::Refused(code, _)) => assert_eq!(code, CloseCode::AuthFailed),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (_, _control, acc) = node.connect(&mut srv, 0).await;
    // Superseded: final, no more dials.
    acc.session
        .close(CloseCode::Superseded, "another connection took over");
    match node.events.recv().await {
        Some(ClientEvent::Fatal(code, _)) => assert_eq!(code, CloseCode::Superseded),
        other => panic!("expected a final close, got {other:?}"),
    }
    assert!(node.events.recv().await.is_none(), "the loop ended");
}

#[tokio::test]
async fn a_reconnect_resumes_the_tls_session_and_keeps_the_identity() {
    use std::sync::atomic::Ordering;
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, fast());
    let mut node = Running::start(client_cfg(addr, pki.node_tls("again"), fast()));
    fn resumed(srv: &Server) -> u64 {
        srv.stats().resumed_handshakes.load(Ordering::Relaxed)
    }
    // One round trip on each connection: the node has the server's ticket before it drops.
    async fn round_trip(node: &mut Running, srv: &mut Server, seq: u64) -> Accepted {
        let (_, mut control, mut acc) = node.connect(srv, seq).await;
        let p: Ping = acc.control.rx.recv().await.unwrap().unwrap();
        assert_eq!(p.seq, seq);
        acc.control.tx.send(&ping(seq)).await.unwrap();
        let back: Ping = control.rx.recv().await.unwrap().unwrap();
        assert_eq!(back.seq, seq);
        acc
    }
    let first = round_trip(&mut node, &mut srv, 1).await;
    assert_eq!(resumed(&srv), 0, "a first connection is a full handshake");
    first.session.close(CloseCode::Shutdown, "restart");
    let second = round_trip(&mut node, &mut srv, 2).await;
    assert_eq!(resumed(&srv), 1, "the re-dial resumed the session");
    assert_eq!(
        second.identity.node_id, "again",
        "the identity of a resumed session is the certificate's"
    );
    assert_eq!(node.client.reconnects(), 1);
}

/// Streams `count` control messages node -> conductor while `disturb` runs once after `at`
/// messages; returns the sequence numbers received in order.
async fn stream_through<F, Fut>(
    control: &mut Control,
    acc: &mut Accepted,
    count: u64,
    at: u64,
    disturb: F,
) -> Vec<u64>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rx = async {
        let mut got = Vec::new();
        while got.len() < count as usize {
            let p: Ping = acc.control.rx.recv().await.unwrap().unwrap();
            got.push(p.seq);
        }
        got
    };
    let tx = async {
        let mut disturb = Some(disturb);
        for seq in 1..=count {
            if seq == at
                && let Some(d) = disturb.take()
            {
                d().await;
            }
            control
                .tx
                .send(&Ping {
                    seq,
                    payload: vec![1; 64],
                })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let (got, ()) = tokio::join!(rx, tx);
    got
}

#[tokio::test]
async fn nat_rebinding_loses_nothing_and_does_not_reconnect() {
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, fast());
    let proxy = UdpProxy::start(addr).await.unwrap();
    let mut node = Running::start(client_cfg(proxy.addr(), pki.node_tls("nat-node"), fast()));
    let (_, mut control, mut acc) = node.connect(&mut srv, 0).await;
    let _: Ping = acc.control.rx.recv().await.unwrap().unwrap();
    let before = acc.session.facts().remote;
    let mut remote = acc.session.remote_changes();
    let watcher = tokio::spawn(acc.session.clone().watch_path());

    let got = stream_through(&mut control, &mut acc, 300, 100, || async {
        proxy.rebind().await.unwrap();
    })
    .await;
    assert_eq!(
        got,
        (1..=300).collect::<Vec<_>>(),
        "every control message, in order"
    );
    remote.wait_for(|a| *a != before).await.unwrap();
    let facts = acc.session.facts();
    assert_ne!(facts.remote, before);
    assert_eq!(facts.remote, proxy.source_addr().unwrap());
    assert!(facts.path_changes >= 1);
    assert_eq!(node.client.reconnects(), 0);
    assert!(node.events.try_recv().is_err(), "no second connection");
    watcher.abort();
}

#[tokio::test]
async fn explicit_rebind_to_a_new_local_port_loses_nothing() {
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, fast());
    let mut node = Running::start(client_cfg(addr, pki.node_tls("mover"), fast()));
    let client = node.client.clone();
    let (_, mut control, mut acc) = node.connect(&mut srv, 0).await;
    let _: Ping = acc.control.rx.recv().await.unwrap().unwrap();
    let old_local = client.local_addr().unwrap();
    let mut remote = acc.session.remote_changes();
    let watcher = tokio::spawn(acc.session.clone().watch_path());

    let got = stream_through(&mut control, &mut acc, 300, 150, || async {
        client.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    })
    .await;
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
    let new_local = client.local_addr().unwrap();
    assert_ne!(new_local.port(), old_local.port());
    remote.wait_for(|a| *a == new_local).await.unwrap();
    assert_eq!(client.reconnects(), 0);
    assert!(node.events.try_recv().is_err(), "no second connection");
    watcher.abort();
}

#[tokio::test]
async fn blackhole_past_the_idle_timeout_reconnects_once_healed() {
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, fast());
    let proxy = UdpProxy::start(addr).await.unwrap();
    let mut node = Running::start(client_cfg(proxy.addr(), pki.node_tls("flaky"), fast()));
    let (_, _control, acc) = node.connect(&mut srv, 0).await;

    proxy.set_blackhole(true);
    // The server's side times out (idle 1.5 s) ...
    let (_, err) = acc.session.closed().await;
    assert!(matches!(err, quinn::ConnectionError::TimedOut), "{err}");
    // ... and heals: the node reconnects by itself and announces the new connection.
    proxy.set_blackhole(false);
    let (session, _control, mut acc2) = node.connect(&mut srv, 1).await;
    assert_eq!(acc2.identity.node_id, "flaky");
    let p: Ping = acc2.control.rx.recv().await.unwrap().unwrap();
    assert_eq!(p.seq, 1);
    assert_eq!(node.client.reconnects(), 1);
    assert_eq!(session.facts().reconnects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_never_waits_behind_a_log_flood() {
    let pki = Pki::new();
    let (mut srv, addr) = server(&pki, TransportSettings::default());
    let (_client, node, mut control, mut acc) = pair(
        &mut srv,
        client_cfg(addr, pki.node_tls("flooder"), TransportSettings::default()),
    )
    .await;
    let _: Ping = acc.control.rx.recv().await.unwrap().unwrap();

    // The conductor drains every log stream as fast as it can.
    let session = acc.session.clone();
    let drained = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let drain = {
        let drained = drained.clone();
        tokio::spawn(async move {
            let mut readers = tokio::task::JoinSet::new();
            while let Ok((kind, mut rx)) = session.accept_uni().await {
                assert_eq!(kind, StreamKind::Log);
                let drained = drained.clone();
                readers.spawn(async move {
                    while let Ok(Some(p)) = rx.recv::<Ping>().await {
                        drained.fetch_add(
                            p.payload.len() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                });
            }
        })
    };
    // Eight log sources flood as fast as they can.
    let stop = CancellationToken::new();
    let mut floods = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut tx = node.open_uni(StreamKind::Log).await.unwrap();
        let stop = stop.clone();
        floods.spawn(async move {
            let chunk = Ping {
                seq: 0,
                payload: vec![b'x'; 16 * 1024],
            };
            while !stop.is_cancelled() {
                if tx.send(&chunk).await.is_err() {
                    break;
                }
            }
        });
    }
    // Wait until the flood is really flowing.
    while drained.load(std::sync::atomic::Ordering::Relaxed) < 8 << 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = stream_through(&mut control, &mut acc, 500, 0, || async {}).await;
    assert_eq!(
        got,
        (1..=500).collect::<Vec<_>>(),
        "all control messages, in order, during the flood"
    );
    assert!(drained.load(std::sync::atomic::Ordering::Relaxed) > 8 << 20);
    stop.cancel();
    while floods.join_next().await.is_some() {}
    drain.abort();
}

/// A node endpoint that only dials and accepts other nodes (no conductor needed).
fn peer_node(pki: &Pki, id: &str) -> Client {
    // The conductor address is never dialled here.
    Client::new(client_cfg(
        "127.0.0.1:9".parse().unwrap(),
        pki.node_tls(id),
        fast(),
    ))
    .unwrap()
}

/// `a` dials `b` expecting `expected` while `b` accepts: both outcomes.
async fn dial_and_accept(
    a: &Client,
    b: &Client,
    expected: &str,
) -> (
    Result<symphony_net::Session, symphony_net::ConnectError>,
    Result<(String, symphony_net::Session), symphony_net::ConnectError>,
) {
    let accept = async {
        let incoming = b.accept_peer().await.unwrap();
        incoming.handshake(Duration::from_secs(5)).await
    };
    tokio::join!(
        a.dial_peer(b.local_addr().unwrap(), expected, Duration::from_secs(5)),
        accept
    )
}

#[tokio::test]
async fn nodes_connect_directly_and_each_checks_the_others_identity() {
    let pki = Pki::new();
    let (a, b) = (peer_node(&pki, "node-a"), peer_node(&pki, "node-b"));
    let b_addr = b.local_addr().unwrap();
    let (dialled, accepted) = dial_and_accept(&a, &b, "node-b").await;
    let (dialled, (id, accepted)) = (dialled.unwrap(), accepted.unwrap());
    assert_eq!(id, "node-a", "the acceptor learns who dialled");
    // A tunnel both ways over the direct connection.
    let mut t = dialled.open_tunnel().await.unwrap();
    t.send.write_all(b"over the direct path").await.unwrap();
    t.send.finish().unwrap();
    let mut back = accepted.accept_tunnel().await.unwrap();
    let got = back.recv.read_to_end(1024).await.unwrap();
    assert_eq!(got, b"over the direct path");

    // Dialling B while expecting another node fails on the dialler's side.
    let wrong = a.dial_peer(b_addr, "node-c", Duration::from_secs(5)).await;
    assert!(
        matches!(wrong, Err(symphony_net::ConnectError::Handshake(_))),
        "{wrong:?}"
    );
    // B saw that attempt too; it fails there as well (the dialler aborted).
    let incoming = b.accept_peer().await.unwrap();
    assert!(incoming.handshake(Duration::from_secs(5)).await.is_err());
}

#[tokio::test]
async fn a_node_of_another_ca_cannot_connect_directly() {
    let pki = Pki::new();
    let other = Pki::new();
    let b = peer_node(&pki, "node-b");
    // Trusts our CA, presents a certificate of another one, claims a name B expects.
    let mut tls = other.node_tls("node-a");
    tls.ca_pem = pki.ca.cert_pem().to_owned();
    let intruder = Client::new(client_cfg("127.0.0.1:9".parse().unwrap(), tls, fast())).unwrap();
    let (dialled, accepted) = dial_and_accept(&intruder, &b, "node-b").await;
    assert!(accepted.is_err(), "B accepted a certificate of another CA");
    if let Ok(s) = dialled {
        // TLS 1.3: the dialler may finish first; B then closes the connection.
        let _ = s.closed().await;
    }
    // And a node of our CA that is presented by a server of another CA is refused too.
    let fake_b = {
        let mut tls = other.node_tls("node-b");
        tls.ca_pem = other.ca.cert_pem().to_owned();
        Client::new(client_cfg("127.0.0.1:9".parse().unwrap(), tls, fast())).unwrap()
    };
    let a = peer_node(&pki, "node-a");
    let fake_addr = fake_b.local_addr().unwrap();
    let _accepting = tokio::spawn(async move {
        while let Some(i) = fake_b.accept_peer().await {
            let _ = i.handshake(Duration::from_secs(5)).await;
        }
    });
    let res = a
        .dial_peer(fake_addr, "node-b", Duration::from_secs(5))
        .await;
    assert!(
        matches!(res, Err(symphony_net::ConnectError::Handshake(_))),
        "{res:?}"
    );
}

#[tokio::test]
async fn the_punch_packet_leaves_the_quic_socket_with_a_low_ttl() {
    use nix::sys::socket::{
        ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt,
    };
    use std::os::fd::AsRawFd;
    let pki = Pki::new();
    let a = peer_node(&pki, "node-a");
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    setsockopt(&rx, sockopt::Ipv4RecvTtl, &true).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    a.punch(rx.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 16];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!(nix::libc::c_int);
    let msg = recvmsg::<SockaddrIn>(
        rx.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    let from = msg.address.unwrap();
    let ttls: Vec<i32> = msg
        .cmsgs()
        .unwrap()
        .filter_map(|c| match c {
            ControlMessageOwned::Ipv4Ttl(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(ttls, vec![symphony_net::PUNCH_TTL]);
    // From the endpoint's own socket (the NAT mapping the conductor sees).
    assert_eq!(from.port(), a.local_addr().unwrap().port());
}

#[tokio::test]
async fn a_dual_stack_node_reaches_an_ipv4_peer_and_punches_it() {
    let pki = Pki::new();
    let b = peer_node(&pki, "node-b");
    let b_addr = b.local_addr().unwrap();
    // Bound to [::]: the socket must take IPv4 too (the conductor names peers by IPv4).
    let mut cfg = client_cfg(
        "127.0.0.1:9".parse().unwrap(),
        pki.node_tls("node-a"),
        fast(),
    );
    cfg.bind = "[::]:0".parse().unwrap();
    let a = Client::new(cfg).unwrap();
    a.punch(b_addr).unwrap();
    let (dialled, accepted) = dial_and_accept(&a, &b, "node-b").await;
    dialled.unwrap();
    assert_eq!(accepted.unwrap().0, "node-a");
}
