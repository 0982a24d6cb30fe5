"""Xenstore's database with xenstored's semantics (Xen docs/misc/xenstore.txt), sans-IO.

The tree is made of immutable `Node`s: a change copies the path from the root down to what it
changes, so a snapshot is one reference. That gives transactions for free: one starts from the
committed tree, works on its own copy, and records what it looked at; at commit, if nothing it
looked at has changed meanwhile, its operations are replayed on the committed tree (so they fire
watches then, and only then), otherwise the commit fails with EAGAIN and the client retries.

A `Connection` is one client: its domain id (0 is privileged), watches and transactions. Watch
events queue on the watching connection for the I/O layer to send. The committed tree is written
through to SQLite (WAL) on every change; a new `Store` on the same file continues from it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from slimvisor.xenstore.wire import (
    DOMID_FIRST_RESERVED,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_REL_PATH_MAX,
    XS_PERM_OWNER,
    XS_PERM_READ,
    XS_PERM_WRITE,
    Perm,
    XenstoreError,
)

__all__ = ["Connection", "Node", "Perm", "Quotas", "Store", "XenstoreError", "domain_path"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# "Paths": the permitted characters; doubled and trailing slashes are checked apart
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")
_LOCAL_DOMAIN = re.compile(r"/local/domain/\d{1,5}/")

# "Watches": the special events invented by xenstored
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

PRIV_DOMID = 0  # xenstored's priv_domid: the toolstack's domain, dom0
_DEFAULT_PERMS = (Perm(PRIV_DOMID, "n"),)  # xenstored's manual_node(): owned by dom0, closed to others
_INITIAL_NODES = ("/", "/tool", "/tool/xenstored")  # what xenstored's setup_structure() creates


def domain_path(domid: int) -> str:
    """GET_DOMAIN_PATH: a domain's home, the base of its relative paths."""
    return f"/local/domain/{domid}"


@dataclass(frozen=True)
class Quotas:
    """xenstored's default hard quotas (tools/xenstored/domain.c); they bind unprivileged domains only.

    A guest is hostile: without these, one connection could make the store (and so the daemon
    serving every domain and the API) hold any amount of memory. xenstored's names are in comments.
    """

    nodes: int = 1000  # "nodes": nodes a domain owns (ENOSPC)
    node_size: int = 2048  # "node-size": bytes of one value (ENOSPC)
    watches: int = 128  # "watches": per domain (E2BIG)
    transactions: int = 10  # "transactions": open at once per domain (ENOSPC)
    transaction_nodes: int = 1024  # "transaction-nodes": paths one transaction looked at + changes it queued (ENOSPC)
    memory: int = 2 * 1024 * 1024 + 512 * 1024  # "memory" (hard): bytes a domain's open transactions hold (ENOMEM)
    permissions: int = 5  # "node-permissions": entries of one node's permission list (ENOSPC)
    path_length: int = XENSTORE_REL_PATH_MAX  # "path-max": below /local/domain/<id>/ (EINVAL)
    # "outstanding" (xenstored: 20 replies): bytes of replies and watch events a domain may leave
    # unread on all its connections; at this the server stops reading its requests, and at twice
    # this (only watch events get there) it drops the domain's connection with the most unread
    output_backlog: int = 256 << 10


@dataclass(frozen=True, eq=False, slots=True)
class Node:
    """One path's value, permissions (first entry: owner, and the default for others) and children.

    Never changed once in a tree: a change makes new nodes, so older trees stay valid snapshots.
    `generation` changes whenever the value, permissions or set of children do (DIRECTORY_PART's gencnt).
    """

    value: bytes
    perms: tuple[Perm, ...]
    children: Mapping[str, Node]
    generation: int

    @property
    def owner(self) -> int:
        return self.perms[0].domid


def _parts(path: str) -> list[str]:
    return [] if path == "/" else path.split("/")[1:]


def _parent(path: str) -> str:
    """As xenstored's get_parent(): "/" for top-level and special paths."""
    cut = path.rfind("/")
    return "/" if cut <= 0 else path[:cut]


def _ancestor(path: str, depth: int) -> str:
    """`path` cut to its first `depth` components ("/" for 0)."""
    return "/" + "/".join(_parts(path)[:depth])


def _is_child(child: str, parent: str) -> bool:
    """Is `child` below `parent` or equal to it (watch matching; "/" matches everything)."""
    return parent == "/" or child == parent or child.startswith(parent + "/")


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


class _Tree:
    """One version of the database: the root node, the special nodes, and how many nodes each domain owns."""

    __slots__ = ("owned", "root", "special")

    def __init__(self, root: Node, special: dict[str, Node], owned: dict[int, int]) -> None:
        self.root = root
        self.special = special
        self.owned = owned

    def copy(self) -> _Tree:
        return _Tree(self.root, dict(self.special), dict(self.owned))

    def get(self, path: str) -> Node | None:
        if path.startswith("@"):
            return self.special.get(path)
        node: Node | None = self.root
        for name in _parts(path):
            assert node is not None
            node = node.children.get(name)
            if node is None:
                return None
        return node

    def chain(self, path: str) -> list[Node]:
        """The nodes from the root down `path` as far as they exist (one walk, however deep)."""
        nodes = [self.root]
        for name in _parts(path):
            child = nodes[-1].children.get(name)
            if child is None:
                break
            nodes.append(child)
        return nodes

    def put(self, path: str, new: Node | None, generation: int) -> None:
        """Set (or with None remove, subtree and all) the node at `path`, whose parent must exist."""
        if path.startswith("@"):
            if new is None:
                self.special.pop(path, None)
            else:
                self.special[path] = new
            return
        if path == "/":
            assert new is not None, "the root cannot be removed"
            self.root = new
            return
        parts = _parts(path)
        chain = [self.root]
        for name in parts[:-1]:
            chain.append(chain[-1].children[name])
        child = new
        for depth in range(len(parts) - 1, -1, -1):
            parent, name = chain[depth], parts[depth]
            children = dict(parent.children)
            if child is None:
                del children[name]
            else:
                children[name] = child
            listed_changed = depth == len(parts) - 1 and (name in parent.children) != (child is not None)
            child = Node(parent.value, parent.perms, children, generation if listed_changed else parent.generation)
        assert child is not None
        self.root = child


def _walk_post(path: str, node: Node) -> Iterator[tuple[str, Node, Node | None]]:
    """(path, node, parent within the subtree) for a subtree, children before their parent, iteratively."""
    stack: list[tuple[str, Node, Node | None, bool]] = [(path, node, None, False)]
    while stack:
        p, n, parent, expanded = stack.pop()
        if expanded or not n.children:
            yield p, n, parent
            continue
        stack.append((p, n, parent, True))
        for name, child in reversed(list(n.children.items())):
            stack.append((_join(p, name), child, n, False))


@dataclass(frozen=True, slots=True)
class _Event:
    """A change to announce: watchers see it if any of `perms` (node, parent, old) lets them read."""

    path: str
    exact: bool  # only watches on exactly this path (removal of a watched descendant, special events)
    perms: tuple[tuple[Perm, ...], ...]


@dataclass(slots=True)
class _Watch:
    path: str  # canonical
    token: str
    prefix_len: int  # relative watches report relative paths


@dataclass(slots=True)
class _Seen:
    """What a transaction saw of one path in its starting snapshot."""

    node: Node | None
    children: bool  # it listed (or removed) the children, so their set matters too


_ENTRY_OVERHEAD = 256  # bytes Python spends on one recorded path or change besides its text (measured 100-380)


@dataclass(eq=False)
class _Transaction:
    id: int
    base: _Tree
    tree: _Tree
    seen: dict[str, _Seen] = field(default_factory=dict)
    ops: list[Callable[[_Change], object]] = field(default_factory=list)
    size: int = 0  # bytes `seen` and `ops` hold (paths, values, _ENTRY_OVERHEAD each): the "memory" quota's count

    def observe(self, path: str, children: bool = False) -> None:
        seen = self.seen.get(path)
        if seen is None:
            self.seen[path] = _Seen(self.base.get(path), children)
        elif children:
            seen.children = True

    def conflicts_with(self, tree: _Tree) -> str | None:
        """A path it looked at that `tree` has changed since the snapshot, if any."""
        for path, seen in self.seen.items():
            now = tree.get(path)
            if now is seen.node:
                continue
            if (
                now is None
                or seen.node is None
                or now.value != seen.node.value
                or now.perms != seen.node.perms
                or (seen.children and list(now.children) != list(seen.node.children))
            ):
                return path
        return None


class _Change:
    """One operation (or one transaction's operation) on a private copy of a tree, as one client.

    Raising leaves the caller's tree untouched; on success the caller adopts `tree`, persists
    `dirty` and announces `events`.
    """

    def __init__(self, store: Store, tree: _Tree, conn: Connection, tx: _Transaction | None) -> None:
        self.store = store
        self.tree = tree
        self.conn = conn
        self.tx = tx
        self.events: list[_Event] = []
        self.dirty: dict[str, Node | None] = {}  # rows to write: nodes whose value or perms changed, or gone

    # -- lookups, with xenstored's choice of errno ---------------------------------------------------
    def _node(self, path: str) -> Node | None:
        self._observe(path)
        return self.tree.get(path)

    def _access(self, path: str, want: int) -> Node:
        """The node, if this client may do `want` to it; else ENOENT or EACCES as get_node_chk_perm():
        "If it's going to fail, we don't want the errno to indicate any information about the node",
        so ENOENT only where the nearest existing ancestor would allow some of `want`."""
        if path.startswith("@"):
            node, above = self._node(path), self.tree.root
        else:
            chain = self.tree.chain(path)  # one walk, so deep paths cost no more than their length
            node = chain[-1] if len(chain) == len(_parts(path)) + 1 else None
            above = chain[-1]
            self._observe(path)
            if node is None:  # what decided ENOENT: the deepest ancestor there, and its child not
                self._observe(_ancestor(path, len(chain) - 1))
                self._observe(_ancestor(path, len(chain)))
        if node is not None:
            if self.conn.perm(node.perms) & want == want:
                return node
            raise XenstoreError("EACCES", path)
        raise XenstoreError("ENOENT" if self.conn.perm(above.perms) & want else "EACCES", path)

    def _observe(self, path: str, children: bool = False) -> None:
        if self.tx is not None:
            self.tx.observe(path, children)

    # -- changes -----------------------------------------------------------------------------------
    def _set(self, path: str, node: Node) -> None:
        self.tree.put(path, node, node.generation)
        self.dirty[path] = node

    def _announce(self, path: str, node: Node, exact: bool = False, old: tuple[Perm, ...] | None = None) -> None:
        parent = self.tree.get(_parent(path))
        perms = [node.perms] + ([parent.perms] if parent is not None else []) + ([old] if old else [])
        self.events.append(_Event(path, exact, tuple(perms)))

    def _create(self, path: str, value: bytes) -> Node:
        """Create `path` and any missing parents; new nodes inherit the parent's permissions,
        and an unprivileged creator owns them (xenstored's construct_node). Built bottom-up and
        put in place at once, so a deep path costs one copy of its ancestors."""
        chain = self.tree.chain(path)
        parts = _parts(path)
        first = len(chain)  # depth of the first missing node
        count = len(parts) - first + 1
        perms = chain[-1].perms
        if not self.conn.privileged:
            perms = (Perm(self.conn.domid, perms[0].access), *perms[1:])
            quota = self.store.quotas.nodes
            if self.tree.owned.get(self.conn.domid, 0) + count > quota:
                raise XenstoreError("ENOSPC", f"domain {self.conn.domid} would own more than {quota} nodes")
        node = target = Node(value, perms, {}, self.store.next_generation())
        self.dirty[path] = node
        for depth in range(len(parts) - 1, first - 1, -1):
            node = Node(b"", perms, {parts[depth]: node}, node.generation)
            self.dirty[_ancestor(path, depth)] = node
        self.tree.put(_ancestor(path, first), node, node.generation)
        self.tree.owned[perms[0].domid] = self.tree.owned.get(perms[0].domid, 0) + count
        return target

    def read(self, path: str) -> bytes:
        return self._access(self.conn.canonical(path), XS_PERM_READ).value

    def directory(self, path: str) -> tuple[int, list[str]]:
        path = self.conn.canonical(path)
        node = self._access(path, XS_PERM_READ)
        self._observe(path, children=True)
        return node.generation, list(node.children)

    def get_perms(self, path: str) -> tuple[Perm, ...]:
        return self._access(self.conn.canonical(path, allow_special=True), XS_PERM_READ).perms

    def write(self, path: str, value: bytes) -> None:
        path = self.conn.canonical(path)
        if not self.conn.privileged and len(value) > self.store.quotas.node_size:
            raise XenstoreError("ENOSPC", f"value of {len(value)} bytes")
        try:
            old = self._access(path, XS_PERM_WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            node = self._create(path, value)
        else:
            node = Node(value, old.perms, old.children, self.store.next_generation())
            self._set(path, node)
        self._announce(path, node)

    def mkdir(self, path: str) -> None:
        path = self.conn.canonical(path)
        try:
            self._access(path, XS_PERM_WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            self._announce(path, self._create(path, b""))

    def rm(self, path: str) -> None:
        path = self.conn.canonical(path)
        try:
            node = self._access(path, XS_PERM_WRITE)
        except XenstoreError as e:
            # "It is not an error if <path> does not exist, but it _is_ an error if <path>'s
            # immediate parent does not exist either."
            if e.name == "ENOENT" and self._node(_parent(path)) is not None:
                return
            raise
        if path == "/":
            raise XenstoreError("EINVAL", "cannot remove /")
        for p, n, parent in _walk_post(path, node):
            self._observe(p, children=True)
            if parent is None:
                self._announce(p, n)
            else:
                self.events.append(_Event(p, True, (n.perms, parent.perms)))
            self.tree.owned[n.owner] -= 1
            self.dirty[p] = None
        self.tree.put(path, None, self.store.next_generation())

    def set_perms(self, path: str, perms: tuple[Perm, ...]) -> None:
        path = self.conn.canonical(path, allow_special=True)
        if not perms:
            raise XenstoreError("EINVAL", "no permissions")
        if not self.conn.privileged and len(perms) > self.store.quotas.permissions:
            raise XenstoreError("ENOSPC", f"{len(perms)} permissions")
        old = self._access(path, XS_PERM_WRITE | XS_PERM_OWNER)
        if not self.conn.privileged and perms[0].domid != old.owner:
            # xenstored says EPERM, which is not in xsd_errors and so goes out as EINVAL
            raise XenstoreError("EACCES", "only a privileged domain may change the owner")
        node = Node(old.value, perms, old.children, self.store.next_generation())
        self._set(path, node)
        self.tree.owned[old.owner] -= 1
        self.tree.owned[node.owner] = self.tree.owned.get(node.owner, 0) + 1
        self._announce(path, node, old=old.perms)

    def special_event(self, path: str) -> None:
        node = self.tree.get(path)
        if node is not None:
            self._announce(path, node, exact=True)


class Connection:
    """One client of the store: an identity, its watches, its transactions, its pending watch events.

    Every database call takes `tx`, a transaction id from `transaction_start()`, or 0 for none.
    Failures raise `XenstoreError` with the errno name xenstored would reply.
    """

    def __init__(self, store: Store, domid: int) -> None:
        self.store = store
        self.domid = domid
        self.watches: list[_Watch] = []
        self.transactions: dict[int, _Transaction] = {}
        self.events: deque[tuple[str, str]] = deque()  # (path, token) of WATCH_EVENTs to send

    @property
    def privileged(self) -> bool:
        return self.domid == PRIV_DOMID

    @property
    def target(self) -> int | None:
        return self.store.targets.get(self.domid)

    def perm(self, perms: tuple[Perm, ...]) -> int:
        """What this client may do to a node with these permissions (xenstored's perm_for_conn)."""
        target = self.target
        if self.privileged or perms[0].domid in (self.domid, target):
            return XS_PERM_READ | XS_PERM_WRITE | XS_PERM_OWNER
        for p in perms[1:]:
            if p.domid in (self.domid, target):
                return p.bits
        return perms[0].bits

    def canonical(self, path: str, allow_special: bool = False) -> str:
        """An absolute path (relative ones are below this client's domain path), or EINVAL."""
        if not _PATH_CHARS.fullmatch(path) or (path.startswith("@") and not allow_special):
            raise XenstoreError("EINVAL", f"invalid path {path!r}")
        if not path.startswith(("/", "@")):
            path = f"{domain_path(self.domid)}/{path}"
        if (path.endswith("/") and path != "/") or "//" in path or len(path) > XENSTORE_ABS_PATH_MAX:
            raise XenstoreError("EINVAL", f"invalid path {path!r}")
        if not self.privileged:
            local = _LOCAL_DOMAIN.match(path)
            if len(path) - (local.end() if local else 0) > self.store.quotas.path_length:
                raise XenstoreError("EINVAL", "path too long")
        return path

    # -- the database -----------------------------------------------------------------------------
    def _run(self, tx_id: int, op: Callable[[_Change], T], mutates: bool = False, cost: int = 0) -> T:
        """Run `op` on the committed tree, or in transaction `tx_id`; `cost`: bytes a queued change holds."""
        if self.store.closed:
            raise XenstoreError("EIO", "store closed")
        if tx_id:
            tx = self._transaction(tx_id)
            before = len(tx.seen)
            change = _Change(self.store, tx.tree.copy(), self, tx)
            try:
                result = op(change)
            except Exception:  # a failed lookup is an observation too (the path must not appear): bound it
                self._transaction_quota(tx, before, None)
                raise
            self._transaction_quota(tx, before, cost if mutates else None)
            tx.tree = change.tree
            if mutates:
                tx.ops.append(op)
            return result
        change = _Change(self.store, self.store.tree.copy(), self, None)
        result = op(change)
        self.store.commit(change)
        return result

    def _transaction_quota(self, tx: _Transaction, before: int, queued: int | None) -> None:
        """Account what an operation added to `tx` (the paths it looked at past the first `before`,
        and `queued` bytes of a change to replay), or undo it and fail the operation if that breaks
        "transaction-nodes" or "memory": a transaction keeps every path it looked at (for the commit's
        conflict check) and every change, so a guest could otherwise grow one without end."""
        added = list(itertools.islice(reversed(tx.seen), len(tx.seen) - before))
        grow = sum(len(path) + _ENTRY_OVERHEAD for path in added) + (0 if queued is None else queued + _ENTRY_OVERHEAD)
        if not self.privileged:
            quotas = self.store.quotas
            error = None
            if len(tx.seen) + len(tx.ops) + (queued is not None) > quotas.transaction_nodes:
                error = XenstoreError("ENOSPC", f"transaction {tx.id}: over {quotas.transaction_nodes} nodes")
            elif self.store.transaction_memory(self.domid) + grow > quotas.memory:
                error = XenstoreError("ENOMEM", f"d{self.domid}'s transactions: over {quotas.memory} bytes")
            if error is not None:
                for path in added:
                    del tx.seen[path]
                raise error
        tx.size += grow

    def read(self, path: str, tx: int = 0) -> bytes:
        return self._run(tx, lambda c: c.read(path))

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return self._run(tx, lambda c: c.directory(path))[1]

    def directory_generation(self, path: str, tx: int = 0) -> tuple[int, list[str]]:
        """The children and the generation count of the node (DIRECTORY_PART's <gencnt>)."""
        return self._run(tx, lambda c: c.directory(path))

    def get_perms(self, path: str, tx: int = 0) -> list[Perm]:
        return list(self._run(tx, lambda c: c.get_perms(path)))

    def write(self, path: str, value: bytes, tx: int = 0) -> None:
        self._run(tx, lambda c: c.write(path, value), mutates=True, cost=len(path) + len(value))

    def mkdir(self, path: str, tx: int = 0) -> None:
        self._run(tx, lambda c: c.mkdir(path), mutates=True, cost=len(path))

    def rm(self, path: str, tx: int = 0) -> None:
        self._run(tx, lambda c: c.rm(path), mutates=True, cost=len(path))

    def set_perms(self, path: str, perms: list[Perm], tx: int = 0) -> None:
        frozen = tuple(perms)
        self._run(tx, lambda c: c.set_perms(path, frozen), mutates=True, cost=len(path) + 8 * len(frozen))

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.read(path, tx)
        except XenstoreError as e:
            if e.name == "ENOENT":
                return False
            raise
        return True

    # -- transactions -----------------------------------------------------------------------------
    def _transaction(self, tx_id: int) -> _Transaction:
        tx = self.transactions.get(tx_id)
        if tx is None:
            raise XenstoreError("ENOENT", f"no transaction {tx_id}")
        return tx

    def transaction_start(self) -> int:
        """A new transaction on a snapshot of the committed tree; its id is never 0."""
        if not self.privileged and self.store.open_transactions(self.domid) >= self.store.quotas.transactions:
            raise XenstoreError("ENOSPC", f"domain {self.domid} has {self.store.quotas.transactions} transactions")
        tx_id = self.store.new_transaction_id()
        self.transactions[tx_id] = _Transaction(tx_id, self.store.tree, self.store.tree.copy())
        return tx_id

    def transaction_end(self, tx_id: int, commit: bool) -> None:
        """Discard, or commit: EAGAIN if anything the transaction looked at was changed by another."""
        tx = self._transaction(tx_id)
        del self.transactions[tx_id]
        if not commit:
            return
        store = self.store
        conflict = tx.conflicts_with(store.tree)
        if conflict is not None:
            raise XenstoreError("EAGAIN", f"{conflict} changed during transaction {tx_id}")
        change = _Change(store, store.tree.copy(), self, None)
        for op in tx.ops:
            op(change)
        store.commit(change)

    # -- watches ----------------------------------------------------------------------------------
    def watch(self, path: str, token: str) -> None:
        """Add a watch; it fires once straight away, with the path as given."""
        relative = not path.startswith(("/", "@"))
        canonical = self.canonical(path, allow_special=True)
        if any(w.path == canonical and w.token == token for w in self.watches):
            raise XenstoreError("EEXIST", f"watch {path} {token}")
        if not self.privileged and self.store.watch_count(self.domid) >= self.store.quotas.watches:
            raise XenstoreError("E2BIG", f"domain {self.domid} has {self.store.quotas.watches} watches")
        watch = _Watch(canonical, token, len(domain_path(self.domid)) + 1 if relative else 0)
        self.watches.append(watch)
        self.events.append((canonical[watch.prefix_len :], token))

    def unwatch(self, path: str, token: str) -> None:
        canonical = self.canonical(path, allow_special=True)
        for watch in self.watches:
            if watch.path == canonical and watch.token == token:
                self.watches.remove(watch)
                return
        raise XenstoreError("ENOENT", f"no watch {path} {token}")

    def reset_watches(self) -> None:
        """RESET_WATCHES: "Reset all watches and transactions of the caller"."""
        self.watches.clear()
        self.transactions.clear()

    def take_events(self) -> list[tuple[str, str]]:
        events = list(self.events)
        self.events.clear()
        return events

    def sees(self, event: _Event) -> bool:
        return self.privileged or any(self.perm(p) & XS_PERM_READ for p in event.perms)

    # -- domain management (privileged) -----------------------------------------------------------
    def _privileged_only(self) -> None:
        if not self.privileged:
            raise XenstoreError("EACCES", "privileged domain only")

    def introduce(self, domid: int) -> None:
        self._privileged_only()
        self.store.introduce(domid)

    def release(self, domid: int) -> None:
        self._privileged_only()
        self.store.release(domid)

    def resume(self, domid: int) -> None:
        self._privileged_only()
        if not self.store.is_introduced(domid):
            raise XenstoreError("ENOENT", f"domain {domid} not introduced")

    def set_target(self, domid: int, target: int) -> None:
        self._privileged_only()
        self.store.targets[domid] = target

    def close(self) -> None:
        """The client is gone: its watches and open transactions go with it."""
        self.reset_watches()
        self.events.clear()
        with contextlib.suppress(ValueError):
            self.store.connections.remove(self)


class _Database:
    """The committed tree in SQLite: one row a node (children follow from the paths), WAL mode."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS nodes (path TEXT PRIMARY KEY, value BLOB NOT NULL, perms TEXT NOT NULL)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")

    def load(self) -> tuple[list[tuple[str, bytes, tuple[Perm, ...]]], int]:
        rows = [
            (path, bytes(value), tuple(Perm.parse(p) for p in perms.split()))
            for path, value, perms in self.db.execute("SELECT path, value, perms FROM nodes ORDER BY rowid")
        ]
        meta = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return rows, int(meta[0]) if meta else 0

    def save(self, dirty: Mapping[str, Node | None], generation: int) -> None:
        with self.db:  # one SQLite transaction per change
            self.db.execute("BEGIN")
            for path, node in dirty.items():
                if node is None:
                    self.db.execute("DELETE FROM nodes WHERE path = ?", (path,))
                else:
                    self.db.execute(
                        "INSERT INTO nodes (path, value, perms) VALUES (?, ?, ?) "
                        "ON CONFLICT(path) DO UPDATE SET value = excluded.value, perms = excluded.perms",
                        (path, node.value, " ".join(map(str, node.perms))),
                    )
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('generation', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (generation,),
            )

    def close(self) -> None:
        self.db.close()


def _build(rows: list[tuple[str, bytes, tuple[Perm, ...]]], generation: Iterator[int]) -> _Tree:
    """A tree from stored rows (parents before children), bottom-up so depth costs no recursion."""
    data: dict[str, tuple[bytes, tuple[Perm, ...]]] = {"/": (b"", _DEFAULT_PERMS)}
    special: dict[str, Node] = {}
    for path, value, perms in rows:
        if path.startswith("@"):
            special[path] = Node(value, perms, {}, next(generation))
        else:
            data[path] = (value, perms)
    listed: dict[str, dict[str, None]] = {}
    for path in list(data):
        while path != "/":  # a missing parent (a damaged file) is recreated empty, like mkdir would
            parent = _parent(path)
            listed.setdefault(parent, {})[path[len(parent) :].lstrip("/")] = None
            if parent in data:
                break
            data[parent] = (b"", data[path][1])
            path = parent
    built: dict[str, Node] = {}
    owned: dict[int, int] = {}
    for path in sorted(data, key=lambda p: p.count("/") if p != "/" else 0, reverse=True):
        value, perms = data[path]
        children = {name: built.pop(_join(path, name)) for name in listed.get(path, {})}
        built[path] = Node(value, perms, children, next(generation))
        owned[perms[0].domid] = owned.get(perms[0].domid, 0) + 1
    for node in special.values():
        owned[node.owner] = owned.get(node.owner, 0) + 1
    return _Tree(built["/"], special, owned)


class Store:
    """The database and everything shared between its clients: connections, domains, generation counter.

    `db` is the SQLite file to persist to (None keeps everything in memory).
    """

    def __init__(self, db: str | os.PathLike[str] | None = None, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.connections: list[Connection] = []
        self.introduced: set[int] = set()
        self.targets: dict[int, int] = {}
        # Called after watch events were queued on connections, so that an I/O layer sends
        # them even when the change came from no client of its own (a toolstack in-process).
        self.event_hooks: list[Callable[[], None]] = []
        self.closed = False
        self._db = _Database(db) if db is not None else None
        rows, last_generation = self._db.load() if self._db is not None else ([], 0)
        self._generation = itertools.count(last_generation + 1)
        self._tx_ids = itertools.count(1)
        fresh = not rows
        if fresh:
            rows = [(path, b"", _DEFAULT_PERMS) for path in (*_INITIAL_NODES, *SPECIAL_PATHS)]
        self.tree = _build(rows, self._generation)
        self.generation = next(self._generation)
        if fresh and self._db is not None:
            self._db.save({path: self.tree.get(path) for path, _, _ in rows}, self.generation)

    def next_generation(self) -> int:
        self.generation = next(self._generation)
        return self.generation

    def connect(self, domid: int = PRIV_DOMID) -> Connection:
        """A new client: `domid` 0 (local tools) is privileged, any other is a guest."""
        conn = Connection(self, domid)
        self.connections.append(conn)
        return conn

    def commit(self, change: _Change) -> None:
        """Make a change the committed tree: persist it first (a failure leaves the tree as it was)."""
        if not change.dirty and change.tree.root is self.tree.root and not change.events:
            return
        if self._db is not None:
            try:
                self._db.save(change.dirty, self.generation)
            except sqlite3.Error as e:
                log.error("xenstore: cannot persist: %s", e)
                raise XenstoreError("EIO", str(e)) from e
        self.tree = change.tree
        self._deliver(change.events)

    def _deliver(self, events: list[_Event]) -> None:
        queued = False
        for event in events:
            for conn in self.connections:
                if not conn.watches or not conn.sees(event):
                    continue
                for w in conn.watches:
                    if event.path == w.path if event.exact else _is_child(event.path, w.path):
                        conn.events.append((event.path[w.prefix_len :], w.token))
                        queued = True
        if queued:
            for hook in list(self.event_hooks):
                hook()

    def new_transaction_id(self) -> int:
        in_use = {t for c in self.connections for t in c.transactions}
        while True:
            tx_id = next(self._tx_ids) & 0xFFFFFFFF
            if tx_id and tx_id not in in_use:
                return tx_id

    def open_transactions(self, domid: int) -> int:
        return sum(len(c.transactions) for c in self.connections if c.domid == domid)

    def transaction_memory(self, domid: int) -> int:
        """Bytes the open transactions of a domain hold (the "memory" quota counts these)."""
        return sum(tx.size for c in self.connections if c.domid == domid for tx in c.transactions.values())

    def watch_count(self, domid: int) -> int:
        return sum(len(c.watches) for c in self.connections if c.domid == domid)

    # -- domains ------------------------------------------------------------------------------------
    def _special_event(self, path: str) -> None:
        change = _Change(self, self.tree, Connection(self, PRIV_DOMID), None)
        change.special_event(path)
        self._deliver(change.events)

    def introduce(self, domid: int) -> None:
        """INTRODUCE: xenstored now talks to the domain; fires @introduceDomain."""
        if domid == PRIV_DOMID or domid >= DOMID_FIRST_RESERVED:
            raise XenstoreError("EINVAL", f"cannot introduce domain {domid}")
        self.introduced.add(domid)
        self._special_event(INTRODUCE_DOMAIN)

    def release(self, domid: int) -> None:
        """RELEASE (or the domain's end): fires @releaseDomain."""
        if domid not in self.introduced:
            raise XenstoreError("ENOENT", f"domain {domid} not introduced")
        self.introduced.discard(domid)
        self.targets.pop(domid, None)
        self._special_event(RELEASE_DOMAIN)

    def is_introduced(self, domid: int) -> bool:
        return domid in self.introduced

    def close(self) -> None:
        self.closed = True
        for conn in list(self.connections):
            conn.close()
        if self._db is not None:
            self._db.close()
            self._db = None
