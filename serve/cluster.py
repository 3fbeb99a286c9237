"""One server over several machines: where each rank runs, the tcp endpoints that reach the remote ones,
and the CURVE keys that keep everyone else out.

Every node runs the same command with its own `--node-rank`; everything here is derived from that config,
so each process builds the same `Layout` by itself. From `--dist-init-addr HOST:PORT`:

    PORT     torch.distributed's store (TCPStore, served by rank 0) - no authentication: see the README
    PORT+1   scheduler PUB -> remote ranks' SUB: step plans and Hellos          (CURVE)
    PORT+2   remote ranks' PUSH -> scheduler PULL: their Hello answers          (CURVE)
    PORT+3   node R's launcher DEALER <-> node 0's launcher ROUTER: join, ready, heartbeats, down   (CURVE)

Node 0 binds these on HOST only. The ranks of node 0 keep their `ipc://` sockets: the scheduler's PUB and
PULL bind both endpoints, the tcp one with CURVE options set in between (ZeroMQ takes a socket's options
as they stand at each bind), so local hops pay nothing for encryption.

One key pair, in one file, is the cluster's secret: node 0 serves with it, and a peer is let in only if it
proves it holds the same secret key (ZAP checks its public key). A file that does not exist is written on
node 0 (mode 0600) and must be copied to the other nodes.
"""

from __future__ import annotations

import os
import socket as pysocket
from dataclasses import dataclass

import zmq
import zmq.auth

from serve.config import Config, ConfigError, split_addr

# Offsets from --dist-init-addr's PORT (PORT itself is torch.distributed's store).
PLAN, RESULTS, LINKS = 1, 2, 3

KEY_FILE_HEADER = "#   serve cluster key: copy this file to every node of one server, and to no one else\n"


@dataclass(frozen=True)
class Keys:
    public: bytes  # z85
    secret: bytes


@dataclass(frozen=True)
class Layout:
    nnodes: int
    node_rank: int
    tp: int
    host: str  # node 0's address, as given
    port: int
    key_file: str

    @classmethod
    def of(cls, config: Config) -> Layout:
        c = config.cluster
        host, port = split_addr(c.dist_init_addr)
        return cls(c.nnodes, c.node_rank, config.engine.tp, host, port, c.key_file)

    @property
    def many(self) -> bool:
        return self.nnodes > 1

    @property
    def tp_per_node(self) -> int:
        return self.tp // self.nnodes

    @property
    def ranks(self) -> range:
        """The tensor-parallel ranks this node runs."""
        return range(self.node_rank * self.tp_per_node, (self.node_rank + 1) * self.tp_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.tp_per_node

    def endpoint(self, offset: int, bind: bool = False) -> str:
        """tcp://HOST:PORT+offset; to bind, HOST as an IP address (ZeroMQ binds addresses, not host names)."""
        host = bind_address(self.host) if bind else self.host
        return f"tcp://[{host}]:{self.port + offset}" if ":" in host else f"tcp://{host}:{self.port + offset}"

    @property
    def dist_init(self) -> str:
        return self.endpoint(0)

    @property
    def ports(self) -> list[int]:
        return [self.port + i for i in range(4)]

    def keys(self) -> Keys:
        return load_keys(self.key_file)


def load_keys(path: str) -> Keys:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cluster.key_file {path}: {e}; copy the file node 0 wrote") from None
    if secret is None:
        raise ConfigError(f"cluster.key_file {path} holds no secret key; copy the file node 0 wrote")
    return Keys(public, secret)


def create_keys(path: str) -> bool:
    """Writes a new key pair to `path` unless a file is there already; True if it wrote one."""
    if os.path.exists(path):
        return False
    public, secret = zmq.curve_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'{KEY_FILE_HEADER}curve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n')
    return True


def bind_secure(sock: zmq.Socket, endpoint: str, keys: Keys) -> None:
    """Binds `endpoint` with CURVE: traffic encrypted, and only peers holding the cluster's key get in."""
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.bind(endpoint)
    _opened(sock, "bind", endpoint)


def connect_secure(sock: zmq.Socket, endpoint: str, keys: Keys) -> None:
    sock.curve_serverkey = keys.public
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.connect(endpoint)
    _opened(sock, "connect", endpoint)


def _opened(sock: zmq.Socket, how: str, endpoint: str) -> None:
    from serve.ipc import OPENED

    OPENED.append(f"{zmq.SocketType(sock.type).name} {how} {endpoint} (curve)")


class _ClusterKeyOnly:
    """ZAP's question, "may this public key in?", answered: only if it is the cluster's own."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


def start_auth(ctx: zmq.Context, keys: Keys):
    """The ZAP handler of this process's context (a thread): without it CURVE would let any key in."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_ClusterKeyOnly(keys.public))
    return auth


def interface_for(host: str) -> str | None:
    """The name of the network interface this machine would use to reach `host` (for GLOO_SOCKET_IFNAME and
    NCCL_SOCKET_IFNAME, which otherwise follow whatever this machine's own host name resolves to)."""
    import psutil

    try:
        family = pysocket.AF_INET6 if ":" in host else pysocket.AF_INET
        with pysocket.socket(family, pysocket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP: no packet is sent; the kernel only picks the route
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local for a in addrs):
            return name
    return None


def bind_address(host: str) -> str:
    """HOST as ZeroMQ binds it: an IP address (ZeroMQ binds interfaces and addresses, not host names)."""
    try:
        info = pysocket.getaddrinfo(host, None, type=pysocket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"cluster.dist_init_addr: cannot resolve {host} ({e})") from None
    return info[0][4][0]
