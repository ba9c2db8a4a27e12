"""The node's lifecycle: builds every service, runs them on one uvloop loop, shuts down gracefully.

Owns start-up order (store → tasks → registry client → listeners → gossip), the data-dir lock that
keeps two nodes off one store, the member id kept in the data dir, the peer port's `/healthz`,
`/metrics` and `/status`, the wiring of the cluster (gossip membership over UDP with push-pull over
the peer port, the peer routes, the tracker, `p2p.ClusterScheduler` as the task manager's source
policy), and the reverse order on SIGTERM: leave the cluster, stop accepting, let in-flight
responses finish for a short grace period, stop downloads, flush metadata. Does not implement any
protocol itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import random
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from d7y_node import __version__
from d7y_node.config import DEFAULT_SNAPSHOTTER_SOCKET, ClusterConfig, Listen, NodeConfig
from d7y_node.errors import ConfigError
from d7y_node.fuse_handover import MOUNTS_SCOPE, SNAPSHOTS_SCOPE, Handover, detach_all
from d7y_node.gossip import (
    ClusterKey,
    EventKind,
    LocalMember,
    LoopClock,
    MemberEvent,
    Membership,
    UdpTransport,
    resolve,
)
from d7y_node.gossip.messages import Address, Load, MemberState
from d7y_node.metrics import Metrics, StatSample
from d7y_node.mounts import ImageResolver, MountManager
from d7y_node.nydus_snapshots import NydusLayers
from d7y_node.p2p import ClusterScheduler, RegistryOrigins
from d7y_node.peer import (
    AUTH_HEADER,
    HttpStreamTransport,
    PeerAuth,
    PeerClient,
    PeerServer,
    TaskManagerPieces,
    task_key_for,
)
from d7y_node.piece_store import PieceStore
from d7y_node.preheat import register_commands
from d7y_node.proxy import ProxyServer
from d7y_node.registry import RegistryClient
from d7y_node.registry_auth import Credentials, RegistryLogin
from d7y_node.scheduler import Tracker
from d7y_node.tasks import PieceSource, TaskManager

if TYPE_CHECKING:
    # Imported when the snapshotter is served (`_start_snapshotter`): its gRPC server,
    # protobuf and SQLite cost about 5 MB of memory, which a node without it does not pay.
    from d7y_node.snapshotter import RemoteLayers, Snapshotter, SnapshotterServer

log = logging.getLogger(__name__)

# In-flight responses get this long to finish after SIGTERM before their connections are closed;
# short, because a client cut off falls back to its next mirror or the origin anyway.
SHUTDOWN_GRACE_SECONDS = 5.0

LOCK_FILE = "node.lock"
# The member id generated on first start, kept so a restarted node is the same member (its
# pieces and its homes stay where they were).
NODE_ID_FILE = "node-id"
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")
# On SIGTERM the leave announcement gets this long to go out before gossip stops (memberlist
# waits about as long): others then record a "left" member at once instead of suspecting it.
LEAVE_WAIT_SECONDS = 2.0
# A join name that resolves to nothing (a headless service before its pods are ready) is tried
# again this often.
JOIN_RETRY_SECONDS = 5.0
# An address in TEST-NET-1 (RFC 5737): "connecting" a UDP socket to it sends nothing but tells
# which local address the default route would use.
_ROUTE_PROBE_ADDRESS = "192.0.2.1"


def node_id_for(data_dir: Path, configured: str | None) -> str:
    """The configured id, else the one stored in the data dir, else a new one stored there
    (the host name and a random suffix: hosts in network namespaces share a host name)."""
    if configured is not None:
        return configured
    path = data_dir / NODE_ID_FILE
    try:
        stored = path.read_text().strip()
    except FileNotFoundError:
        stored = ""
    except OSError as err:
        raise ConfigError("node_id", f"cannot read {path}: {err.strerror}") from None
    if _NODE_ID.fullmatch(stored):
        return stored
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:100].strip("-.") or "node"
    new = f"{host}-{secrets.token_hex(4)}"
    try:
        temp = path.with_name(f"{NODE_ID_FILE}.{secrets.token_hex(4)}.tmp")
        temp.write_text(new + "\n")
        os.replace(temp, path)
    except OSError as err:
        raise ConfigError("node_id", f"cannot store a node id in {path}: {err.strerror}") from None
    return new


def advertise_address(cluster: ClusterConfig) -> str:
    """Where other members reach us: the configured address, else the gossip listen address
    if it is a specific one, else the local address of the default route (or loopback)."""
    if cluster.advertise_addr is not None:
        return cluster.advertise_addr
    host = cluster.gossip_listen.host
    if not ipaddress.ip_address(host).is_unspecified:
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((_ROUTE_PROBE_ADDRESS, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def read_cluster_key(cluster: ClusterConfig) -> ClusterKey | None:
    if cluster.secret_file is None:
        return None
    try:
        secret = cluster.secret_file.read_bytes().strip()
    except OSError as err:
        raise ConfigError(
            "secret_file", f"cannot read {cluster.secret_file}: {err.strerror}"
        ) from None
    return ClusterKey(secret)


def release_free_heap() -> None:
    """Hand the heap that start-up freed (imports, reloading the store) back to the kernel.

    glibc keeps freed heap pages mapped; an idle node would otherwise carry a couple of MB of
    start-up garbage in its RSS for good. Does nothing where glibc is not the C library."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class DataDirLock:
    """An exclusive `flock` on the data dir, so two nodes never share one piece store."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the node's whole life
        except OSError as err:
            raise ConfigError(
                "data_dir", f"cannot use {self.path.parent}: {err.strerror}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(
                "data_dir", f"{self.path.parent} is in use by another d7y-node (pid {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Node:
    """One host's d7y-node: every service, wired together and run on the current loop."""

    def __init__(self, config: NodeConfig, *, remote_layers: RemoteLayers | None = None) -> None:
        self.config = config
        # containerd's snapshotter (built in `start`); `remote_layers` is its hook for remote
        # (Nydus) layers, replaceable until `start` (None: plain layers only).
        self.remote_layers: RemoteLayers | None = remote_layers
        self.snapshotter: Snapshotter | None = None
        self.snapshotter_server: SnapshotterServer | None = None
        self.metrics = Metrics()
        self.store = PieceStore(config.store, self.metrics)
        self.tasks = TaskManager(
            self.store, config.tasks, self.metrics, source_policy=self._source_policy
        )
        self.registry = RegistryClient(config.registry, self.metrics)
        self.proxy = ProxyServer(config.proxy, self.tasks, self.registry, self.metrics)
        self._lock = DataDirLock(config.store.data_dir)
        self._runners: list[web.AppRunner] = []
        self._ready = False
        # Where each listener really bound (a configured port 0 becomes a real one).
        self.proxy_address: Listen | None = None
        self.peer_address: Listen | None = None
        self.gossip_address: Address | None = None
        # The cluster (built in `start`, on the loop).
        cluster = config.cluster
        self.cluster_key = read_cluster_key(cluster)
        self.peer_auth = PeerAuth(self.cluster_key) if self.cluster_key is not None else None
        self.member_id: str | None = None
        self.tracker = Tracker(time.monotonic)
        self.peer_server = PeerServer(
            TaskManagerPieces(self.tasks), auth=self.peer_auth, tracker=self.tracker
        )
        self.session: aiohttp.ClientSession | None = None
        self.peer_client: PeerClient | None = None
        self.stream: HttpStreamTransport | None = None
        self.scheduler: ClusterScheduler | None = None
        self.membership: Membership | None = None
        self._udp: UdpTransport | None = None
        self._join_task: asyncio.Task[None] | None = None
        self.metrics.observe(self._cluster_samples)
        # Mounts served by this node (`d7y-node mount`): unmounted on stop, stale ones cleaned
        # and the recorded ones mounted again at start.
        # With `fuse_handover`, a keeper process holds every mount's FUSE connection, so a
        # killed node's mounts are served on by its next start (fuse_handover.py).
        data_dir = config.store.data_dir
        self.mounts = MountManager(
            data_dir, auth=self.peer_auth,
            resolver=ImageResolver(
                self.registry, self.tasks, data_dir, config.registry.insecure_registries,
                login=RegistryLogin(self.registry, Credentials.of(config.registry.auth_file)),
            ),
            handover=Handover(data_dir, MOUNTS_SCOPE) if config.fuse_handover else None,
        )
        if remote_layers is None and self.mounts.resolver is not None:
            # Nydus images as remote snapshots (nydus_snapshots.py): blobs through this node.
            self.remote_layers = NydusLayers.for_node(
                data_dir, self.mounts.resolver,
                handover=Handover(data_dir, SNAPSHOTS_SCOPE) if config.fuse_handover else None,
            )

    async def start(self) -> None:
        """Start every service; returns once both ports accept connections."""
        self._lock.acquire()
        try:
            await self.store.open()
            await self.tasks.start()
            if not self.config.fuse_handover:
                # Connections a run with the handover on left in its keeper: nobody serves them.
                await detach_all(self.config.store.data_dir)
            # The mounts a node served here before a stop or crash are mounted again.
            await self.mounts.restore()
            self.member_id = node_id_for(self.config.store.data_dir, self.config.cluster.node_id)
            self._build_cluster()
            self.proxy_address = await self._serve(self.proxy.app(), self.config.proxy.listen)
            self.peer_address = await self._serve(self._peer_app(), self.config.peer_listen)
            self.mounts.advertise(self.peer_address)
            await self._start_gossip()
            await self._start_snapshotter()
        except BaseException:
            await self.stop()
            raise
        self._ready = True
        release_free_heap()
        log.info(
            "d7y-node %s ready: mirror on %s, peer on %s, gossip on %s as %s, data in %s",
            __version__, self.proxy_address, self.peer_address, self.gossip_address,
            self.member_id, self.config.store.data_dir,
        )

    async def stop(self) -> None:
        """Stop accepting, let responses finish briefly, stop downloads, flush, release the dir."""
        self._ready = False
        if self.snapshotter_server is not None:
            # containerd gets no new calls; the snapshotter itself closes with the services.
            await self.snapshotter_server.close()
            self.snapshotter_server = None
        await self._stop_gossip()
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        for step in (self._close_snapshotter,
                     self.mounts.close, self.tasks.close, self._close_cluster, self.registry.close,
                     self.store.close):
            try:
                await step()
            except Exception:
                log.exception("error while stopping %s", step.__qualname__)
        self._lock.release()

    async def run_until_signalled(self) -> None:
        """Start, wait for SIGTERM or SIGINT, stop."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        try:
            await self.start()
            await stopping.wait()
            log.info("shutting down")
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self.stop()
        log.info("stopped")

    async def _serve(self, app: web.Application, listen: Listen) -> Listen:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_SECONDS
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(
            runner, listen.host, listen.port,
            reuse_address=True,
        )
        try:
            await site.start()
        except OSError as err:
            raise ConfigError("listen", f"cannot listen on {listen}: {err.strerror}") from None
        server = site._server  # the asyncio server: the only way to learn a port-0 bind
        sockets = getattr(server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2] if sockets else (listen.host, listen.port)
        return Listen(str(host), int(port))

    def _peer_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        self.peer_server.register(app)
        register_commands(app, self)  # `get` and `preheat` (fetch.py, preheat.py)
        self.mounts.register(app)  # `mount` and `umount` (mounts.py)
        return app

    # -- containerd's snapshotter --------------------------------------------------------------

    async def _start_snapshotter(self) -> None:
        """Database opened and swept, remote mounts restored, then the sockets (the configured
        one, and nydus-snapshotter's path if no other process serves it)."""
        settings = self.config.snapshotter
        if settings.socket is None and settings.nydus_socket is None:
            return
        from d7y_node.snapshotter import (
            SNAPSHOTTER_DIR,
            NoRemoteLayers,
            SnapshotsService,
            Snapshotter,
            SnapshotterServer,
        )

        snapshotter = Snapshotter(
            self.config.store.data_dir / SNAPSHOTTER_DIR,
            remote=self.remote_layers if self.remote_layers is not None else NoRemoteLayers(),
        )
        self.snapshotter = snapshotter
        await snapshotter.open()
        server = SnapshotterServer(SnapshotsService(snapshotter))
        self.snapshotter_server = server
        if settings.socket is not None:
            # The default path is best effort (another node on this host may hold it); a path
            # the user chose must be ours.
            await server.listen(settings.socket,
                                required=settings.socket != DEFAULT_SNAPSHOTTER_SOCKET)
        if settings.nydus_socket is not None and settings.nydus_socket != settings.socket:
            await server.listen(settings.nydus_socket, required=False, key="nydus_socket")

    async def _close_snapshotter(self) -> None:
        if self.snapshotter_server is not None:
            await self.snapshotter_server.close()
            self.snapshotter_server = None
        snapshotter, self.snapshotter = self.snapshotter, None
        if snapshotter is not None:
            await snapshotter.close()

    # -- the cluster ---------------------------------------------------------------------------

    def _source_policy(self, task_id: str, source: PieceSource) -> PieceSource:
        """The task manager's source policy: the cluster's once it runs, else the origin."""
        if self.scheduler is None:
            return source
        return self.scheduler.source_policy(task_id, source)

    def _build_cluster(self) -> None:
        """The peer client, push-pull transport and scheduler (they need the running loop)."""
        assert self.member_id is not None
        self.session = aiohttp.ClientSession()
        self.peer_client = PeerClient(self.session, auth=self.peer_auth)
        self.stream = HttpStreamTransport(self.peer_client)
        self.peer_server.stream = self.stream
        self.peer_server.local_id = self.member_id
        self.scheduler = ClusterScheduler(
            client=self.peer_client, server=self.peer_server,
            bitmap=self.tasks.bitmap, homes=self.config.cluster.homes,
            home_timeout=self.config.cluster.home_timeout,
            labels=dict(self.config.cluster.labels), wait_pieces=self.tasks.wait_pieces,
            open_task=self.tasks.open, origins=RegistryOrigins(self.registry),
            last_read=self.tasks.last_read,
        )
        self.peer_server.replicate = self.scheduler.replicate
        # Home 0 fetches a task from origin for the swarm on an announce (`p2p` docstring).
        self.peer_server.seed = self.scheduler.seed

    async def _start_gossip(self) -> None:
        cluster = self.config.cluster
        assert self.member_id is not None and self.peer_address is not None
        assert self.scheduler is not None
        listen = cluster.gossip_listen
        try:
            self._udp = await UdpTransport.bind(listen.host, listen.port)
        except OSError as err:
            raise ConfigError(
                "gossip_listen", f"cannot listen on {listen}/udp: {err.strerror}"
            ) from None
        advertised = Address(advertise_address(cluster), self._udp.local_address.port)
        self.gossip_address = advertised
        local = LocalMember(
            member_id=self.member_id, address=advertised, peer_port=self.peer_address.port,
            labels=dict(cluster.labels),
            load=Load(free_upload_slots=self.peer_server.slots.capacity),
        )
        membership = Membership(
            local=local, transport=self._udp, clock=LoopClock(), rng=random.Random(),
            stream=self.stream, cluster_key=self.cluster_key,
        )
        membership.subscribe(self._member_changed)
        membership.start()
        self.membership = membership
        self.peer_server.directory = membership
        self.scheduler.membership = membership
        if cluster.join:
            self._join_task = asyncio.create_task(self._join(cluster.join), name="gossip join")

    def _member_changed(self, event: MemberEvent) -> None:
        if event.kind in (EventKind.DEAD, EventKind.LEAVE) and self.scheduler is not None:
            self.scheduler.forget_member(event.member.member_id)
        if event.kind is not EventKind.UPDATE:
            log.info("member %s: %s (%s)", event.member.member_id, event.kind.value,
                     event.member.address)

    async def _join(self, seeds: Iterable[str]) -> None:
        """Resolve every seed (a name may give several addresses: all are joined) and join
        them; names that resolve to nothing yet are tried again until one does."""
        while self.membership is not None:
            found: list[Address] = []
            for seed in seeds:
                host, _, port = seed.rpartition(":")
                try:
                    found.extend(await resolve(host.strip("[]"), int(port)))
                except OSError as err:
                    log.warning("cannot resolve %s to join it: %s", seed, err)
            if found:
                log.info("joining %s", ", ".join(str(address) for address in found))
                self.membership.join(found)
                return
            await asyncio.sleep(JOIN_RETRY_SECONDS)

    async def _stop_gossip(self) -> None:
        """Tell the cluster we leave (so nobody waits for us as a home), then stop gossip."""
        if self._join_task is not None:
            self._join_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._join_task
            self._join_task = None
        membership, self.membership = self.membership, None
        if self.scheduler is not None:
            self.scheduler.membership = None
        if membership is not None:
            try:
                await membership.leave_and_wait(LEAVE_WAIT_SECONDS)
            finally:
                membership.stop()
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    async def _close_cluster(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.stream is not None:
            await self.stream.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _cluster_samples(self) -> list[StatSample]:
        """Gossip, peer and scheduling counters, read at every scrape."""
        samples: list[StatSample] = []

        def add(name: str, help_text: str, value: float, kind: str = "counter",
                **labels: str) -> None:
            samples.append(StatSample(name, help_text, value, labels, kind))

        membership = self.membership
        if membership is not None:
            gossip = membership.stats
            add("d7y_gossip_packets_sent", "Gossip packets sent", gossip.packets_sent)
            add("d7y_gossip_packets_received", "Gossip packets received",
                gossip.packets_received)
            for reason, value in (
                ("oversized", gossip.dropped_oversized),
                ("unauthenticated", gossip.dropped_unauthenticated),
                ("malformed", gossip.dropped_malformed),
                ("stream_unauthenticated", gossip.streams_unauthenticated),
                ("stream_malformed", gossip.streams_malformed),
            ):
                add("d7y_gossip_dropped", "Gossip packets and streams dropped", value,
                    reason=reason)
            add("d7y_gossip_probes_failed", "Probes without an ack in time",
                gossip.probes_failed)
            add("d7y_gossip_refutations", "Suspicions of this member refuted",
                gossip.refutations)
            add("d7y_gossip_push_pulls", "Push-pull state exchanges", gossip.push_pulls)
            for state in MemberState:
                add("d7y_gossip_members", "Members by state",
                    len(membership.member_ids(state)), "gauge", state=state.name.lower())
            add("d7y_gossip_health_score", "Lifeguard local health (0 is healthy)",
                membership.health_score, "gauge")
        served = self.peer_server.stats
        add("d7y_peer_pieces_served", "Pieces uploaded to peers", served.pieces_served)
        add("d7y_peer_bytes_served", "Bytes uploaded to peers", served.bytes_served)
        add("d7y_peer_ranges_served", "Parts of pieces uploaded to lazy peers",
            served.ranges_served)
        add("d7y_peer_ranges_missing",
            "Parts of pieces asked for that were neither held nor fetched in time",
            served.ranges_missing)
        add("d7y_peer_busy", "Peer requests refused for want of a slot", served.busy)
        add("d7y_peer_announces", "Announces received as a task's home", served.announces)
        for reason in ("missing", "invalid", "stale"):
            add("d7y_peer_unauthenticated", "Peer requests refused for bad authentication",
                served.unauthenticated[reason], reason=reason)
        add("d7y_peer_bad_requests", "Malformed peer requests", served.bad_requests)
        if self.peer_client is not None:
            client = self.peer_client.stats
            add("d7y_peer_pieces_fetched", "Pieces downloaded from peers", client.pieces_fetched)
            add("d7y_peer_piece_digest_failures",
                "Pieces from peers that did not match their xxh3", client.piece_digest_failures)
        if self.scheduler is not None:
            stats = self.scheduler.stats
            add("d7y_p2p_origin_bytes", "Bytes this host fetched from origin for the cluster",
                stats.origin_bytes)
            add("d7y_p2p_peer_bytes", "Bytes this host fetched from peers", stats.peer_bytes)
            add("d7y_p2p_range_bytes",
                "Bytes this host fetched from peers as parts of pieces (lazy reads)",
                stats.range_bytes)
            add("d7y_p2p_home_tasks", "Tasks fetched from origin as their home", stats.home_tasks)
            add("d7y_p2p_origin_fallbacks",
                "Tasks fetched from origin because no home answered in time", stats.fallbacks)
            add("d7y_p2p_peers_dropped", "Parents dropped for a corrupt piece",
                stats.peers_dropped)
            for outcome, value in (("started", stats.seeds_started),
                                   ("completed", stats.seeds_completed),
                                   ("failed", stats.seeds_failed),
                                   ("refused", stats.seeds_refused)):
                add("d7y_p2p_seeds", "Origin downloads run as home 0 for a swarm", value,
                    outcome=outcome)
        return samples

    def status(self) -> dict[str, Any]:
        """What `d7y-node status` shows: members and local tasks."""
        members: list[dict[str, Any]] = []
        if self.membership is not None:
            for member in self.membership.members():
                members.append({
                    "id": member.member_id,
                    "address": str(member.address),
                    "peer_port": member.peer_port,
                    "state": member.state.name.lower(),
                    "labels": dict(member.labels),
                    "load": {
                        "free_upload_slots": member.load.free_upload_slots,
                        "upload_bytes_per_second": member.load.upload_bytes_per_second,
                        "download_bytes_per_second": member.load.download_bytes_per_second,
                    },
                    "self": member.member_id == self.member_id,
                })
        traffic = self.scheduler.traffic if self.scheduler is not None else {}
        tasks: list[dict[str, Any]] = []
        for stored in self.store.tasks():
            info = self.tasks.info(stored.task_id)
            if info is None:
                continue
            record = traffic.get(stored.task_id)
            homes = (
                self.scheduler.homes(task_key_for(stored.task_id))
                if self.scheduler is not None else []
            )
            tasks.append({
                "task_id": info.task_id,
                "content_length": info.content_length,
                "pieces_done": info.pieces_done,
                "piece_count": info.piece_count,
                "complete": info.complete,
                "origin_bytes": record.origin_bytes if record is not None else 0,
                "peer_bytes": record.peer_bytes if record is not None else 0,
                "parents": sorted(record.parents) if record is not None else [],
                "homes": homes,
            })
        return {
            "version": __version__,
            "member_id": self.member_id,
            "gossip_address": str(self.gossip_address) if self.gossip_address else None,
            "members": members,
            "tasks": tasks,
        }

    async def _status(self, request: web.Request) -> web.Response:
        # With a cluster key, the member list and task digests are for the cluster's eyes only
        # (`d7y-node status` signs its request); /healthz and /metrics stay open for probes.
        if self.peer_auth is not None:
            refused = self.peer_auth.check(
                request.method, request.raw_path, request.headers.get(AUTH_HEADER), b""
            )
            if refused is not None:
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": f"peer auth {refused}"}]},
                    status=401,
                )
        return web.json_response(self.status())

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self._ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok", "version": __version__})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": self.metrics.content_type})
