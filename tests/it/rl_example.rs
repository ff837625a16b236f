//! The SurrealAI seed's RL example, as programs that read only the `SYMPH_*` variables (and
//! the replica variables): shared by the loopback tests and the NAT test bed.

/// The learner: serves `replay-server` and `parameter-server` where `SYMPH_*` says; each
/// answers `<service>:<what it read>`.
pub const LEARNER: &str = "import os, socket, threading
def serve(name):
    v = 'SYMPH_' + name.upper().replace('-', '_')
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((os.environ[v + '_HOST'], int(os.environ[v + '_PORT'])))
    s.listen()
    while True:
        c, _ = s.accept()
        c.sendall(name.encode() + b':' + c.recv(100))
        c.close()
threading.Thread(target=serve, args=('replay-server',), daemon=True).start()
serve('parameter-server')
";

/// An agent: one round trip with each service through `SYMPH_<NAME>_ADDR`, then exit 0 (3 on
/// a wrong answer). It retries while the learner is not listening yet.
pub const AGENT: &str = "import os, socket, sys, time
def ask(name):
    host, port = os.environ['SYMPH_' + name.upper().replace('-', '_') + '_ADDR'].rsplit(':', 1)
    me = os.environ.get('SYMPHONY_PROCESS', '?').encode()
    for _ in range(600):
        try:
            c = socket.create_connection((host, int(port)), timeout=5)
            c.sendall(me)
            answer = c.recv(100)
            if answer:
                return answer
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(2)
for name in ('replay-server', 'parameter-server'):
    want = name.encode() + b':' + os.environ['SYMPHONY_PROCESS'].encode()
    if ask(name) != want:
        sys.exit(3)
print('round trip ok', os.environ['SYMPHONY_REPLICA_INDEX'], 'of', os.environ['SYMPHONY_REPLICAS'])
";
