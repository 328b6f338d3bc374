"""What the real node changes on this host, and how to put it back.

The real node (``localcluster.up(node="real")``) runs containerd, the kubelet,
kube-proxy and CoreDNS as root on this machine. Their files live in the
cluster's state directory as far as their configuration allows, but some of
what they do is host-wide: a bridge for the pods, sysctls, iptables chains,
cgroups, mounts, and a few fixed paths. ``snapshot`` records the host before
any of it happens; the ``remove_*`` functions undo it and are idempotent, so
``down`` can run them again after a crash; ``leftovers`` lists what remains.

Standard library only; the host tools used are ip, iptables(-save/-restore),
ip6tables(-save/-restore), nft (when installed), umount and rm.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

# Sysctls the node changes on the host, with the value found restored on
# teardown. The kubelet sets the kernel ones at start (its "kernel tunables",
# unless protectKernelDefaults makes it refuse to start); the CNI bridge
# plugin turns on forwarding; `up` turns on bridge-nf-call-iptables if it is
# off; kube-proxy would set route_localnet for localhost NodePorts (off here).
NODE_SYSCTLS = (
    "net.ipv4.ip_forward",  # first: writing it also resets the one below and each interface's forwarding
    "net.ipv4.conf.all.accept_redirects",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.ipv4.conf.all.route_localnet",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)

# Paths outside the state directory that the components write whatever their
# configuration says: the kubelet's device-plugin socket
# (/var/lib/kubelet/device-plugins) and its /var/log/containers symlinks,
# libcni's result cache (/var/lib/cni/results) and the shims' sockets
# (/run/containerd/s). Our entries in them are removed on teardown, and each
# directory too when it did not exist before and nothing else is left in it.
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
)

DEVICE_PLUGIN_SOCKET = "/var/lib/kubelet/device-plugins/kubelet.sock"  # the kubelet's, whatever its root dir

CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBEPODS = "kubepods"  # the kubelet's pod cgroup (cgroupfs driver, cgroupRoot "/")
IPTABLES = ("iptables", "ip6tables")
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw", "security")


# The host tools live in sbin directories, which a user's PATH may lack.
HOST_PATH = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/local/sbin:/usr/sbin:/sbin"


class HostError(RuntimeError):
    pass


def execute(argv: list[str], *, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=False,
                          env={**os.environ, "PATH": HOST_PATH})


def run(argv: list[str], *, input: str | None = None, check: bool = True) -> str:
    proc = execute(argv, input=input)
    if check and proc.returncode != 0:
        raise HostError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def have(command: str) -> bool:
    return shutil.which(command, path=HOST_PATH) is not None


# --- sysctls ---------------------------------------------------------------

def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls(names=NODE_SYSCTLS) -> dict[str, str]:
    values = {}
    for name in names:
        try:
            values[name] = _sysctl_path(name).read_text().strip()
        except OSError:
            pass  # not on this kernel (br_netfilter not loaded, say)
    return values


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value + "\n")


def changed_sysctls(recorded: dict[str, str]) -> dict[str, tuple[str, str]]:
    now = read_sysctls(recorded)
    return {name: (value, now[name]) for name, value in recorded.items() if now.get(name) != value}


def restore_sysctls(recorded: dict[str, str]) -> None:
    for name, (value, _) in changed_sysctls(recorded).items():
        write_sysctl(name, value)


# --- the pods' bridge ------------------------------------------------------

def _ip_json(*args: str) -> list[dict]:
    return json.loads(run(["ip", "-j", *args]) or "[]")


def pick_pod_subnet(avoid: list[str]) -> ipaddress.IPv4Network:
    """A private /24 that overlaps no address or route of this host nor `avoid`."""
    taken = [ipaddress.ip_network(n) for n in avoid]
    for addr in _ip_json("-4", "addr"):
        for info in addr.get("addr_info", []):
            taken.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "")
        if dst and dst != "default" and route.get("type") not in ("local", "broadcast"):
            taken.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
    for third in range(244, 256):
        candidate = ipaddress.ip_network(f"10.{third}.0.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise HostError("no free private /24 for the pods (tried 10.244.0.0/24 to 10.255.0.0/24)")


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def link_alias(name: str) -> str:
    try:
        return Path("/sys/class/net", name, "ifalias").read_text().strip()
    except OSError:
        return ""


def create_bridge(name: str, gateway: ipaddress.IPv4Interface, owner: str) -> None:
    """The CNI bridge, made before the API server starts so that it can bind
    and advertise the gateway address. The alias names the state directory
    that owns it, for a second `up` to say who holds the host."""
    run(["ip", "link", "add", name, "type", "bridge"])
    run(["ip", "link", "set", name, "alias", owner[:255]])
    run(["ip", "addr", "add", str(gateway), "dev", name])
    run(["ip", "link", "set", name, "up"])


def delete_link(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "delete", name], check=False)


# --- iptables --------------------------------------------------------------

def _save(binary: str, table: str) -> list[str]:
    if not have(binary + "-save"):
        return []
    return run([binary + "-save", "-t", table], check=False).splitlines()


def kube_chains() -> list[str]:
    """Every KUBE-* chain, as 'iptables nat KUBE-SERVICES'."""
    found = []
    for binary in IPTABLES:
        for table in IPTABLES_TABLES:
            for line in _save(binary, table):
                if line.startswith(":KUBE-"):
                    found.append(f"{binary} {table} {line[1:].split()[0]}")
    return found


def remove_kube_chains() -> None:
    """Delete the kubelet's and kube-proxy's chains (KUBE-*) in every table,
    after the rules of other chains that jump to them, in one
    iptables-restore per table."""
    for binary in IPTABLES:
        for table in IPTABLES_TABLES:
            lines = _save(binary, table)
            chains = [line[1:].split()[0] for line in lines if line.startswith(":KUBE-")]
            if not chains:
                continue
            jumps = [
                "-D " + line[3:] for line in lines
                if line.startswith("-A ") and not line.startswith("-A KUBE-")
                and (" -j KUBE-" in line or " -g KUBE-" in line)
            ]
            script = [f"*{table}", *jumps, *(f"-F {c}" for c in chains), *(f"-X {c}" for c in chains), "COMMIT", ""]
            run([binary + "-restore", "--noflush"], input="\n".join(script))


def nft_tables() -> list[str]:
    """nftables tables as 'family name' (iptables-nft creates them on first use)."""
    if not have("nft"):
        return []
    data = json.loads(run(["nft", "-j", "list", "tables"], check=False) or "{}")
    return [f"{t['table']['family']} {t['table']['name']}" for t in data.get("nftables", []) if "table" in t]


def _nft_rule_count(table: str) -> int:
    data = json.loads(run(["nft", "-j", "list", "table", *table.split()], check=False) or "{}")
    return sum(1 for item in data.get("nftables", []) if "rule" in item)


def remove_created_nft_tables(before: list[str]) -> None:
    """Tables that did not exist before `up` and hold no rule any more."""
    for table in nft_tables():
        if table not in before and _nft_rule_count(table) == 0:
            run(["nft", "delete", "table", *table.split()], check=False)


def created_nft_tables(before: list[str]) -> list[str]:
    return [t for t in nft_tables() if t not in before]


# --- cgroups and processes -------------------------------------------------

def kubepods_cgroups() -> list[Path]:
    """The kubelet's pod cgroup in each hierarchy (v1) or the unified one (v2)."""
    return [p for p in [CGROUP_ROOT / KUBEPODS, *CGROUP_ROOT.glob(f"*/{KUBEPODS}")] if p.is_dir()]


def _cgroup_dirs(top: Path) -> list[Path]:
    """Every cgroup below `top`, deepest first. os.walk skips a cgroup the kubelet or a container
    removes mid-walk (Path.rglob would raise)."""
    dirs = [Path(root) for root, _subdirs, _files in os.walk(top)]
    return sorted(dirs, key=lambda p: -len(p.parts))


def kubepods_processes() -> set[int]:
    pids: set[int] = set()
    for top in kubepods_cgroups():
        for cgroup in _cgroup_dirs(top):
            try:
                pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
    return pids


def kill_kubepods_processes(timeout: float = 10.0) -> None:
    """SIGKILL every container process (they are all under kubepods), until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := kubepods_processes()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_kubepods_cgroups() -> None:
    for top in kubepods_cgroups():
        for cgroup in _cgroup_dirs(top):  # includes `top` itself, last
            try:
                cgroup.rmdir()
            except OSError:
                pass


def processes_of(executables: list[str], mentioning: str) -> dict[int, str]:
    """Live processes running one of these executables with `mentioning` (the
    state directory) on their command line, by pid: the components, the
    shims (their -address is containerd's socket), a ctr of ours; not the same
    binaries run for another purpose."""
    wanted = {os.path.realpath(e) for e in executables}
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            if exe in wanted and mentioning.encode() in (entry / "cmdline").read_bytes():
                found[int(entry.name)] = os.path.basename(exe)
        except OSError:
            continue
    return found


def unix_socket_paths(pid: int) -> list[str]:
    """The paths of the unix sockets a process holds open (a shim's listening socket, say)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
        table = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return []
    # Num RefCount Protocol Flags Type St Inode Path
    return [fields[7] for fields in map(str.split, table) if len(fields) > 7 and fields[6] in inodes]


# --- mounts ----------------------------------------------------------------

def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape")


def mounts_under(roots: list[str]) -> list[str]:
    """Mount points at or under any of `roots`, deepest first."""
    prefixes = [os.path.realpath(r) for r in roots]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return sorted(found, key=lambda p: -p.count("/"))


def unmount_all(roots: list[str]) -> None:
    """Unmount everything under `roots`: the kubelet's volumes and its
    self-bind of its root directory, containers' root filesystems, sandbox
    /dev/shm and network-namespace bind mounts. Stacked mounts take several
    rounds; a busy one is detached lazily."""
    for _ in range(10):
        points = mounts_under(roots)
        if not points:
            return
        for point in points:
            if execute(["umount", point]).returncode != 0:
                execute(["umount", "-l", point])


# --- DNS -------------------------------------------------------------------

def dns_query(server: str, name: str, *, port: int = 53, timeout: float = 2.0) -> list[str]:
    """The A records a DNS server answers for `name` (one UDP query)."""
    query_id = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, port))
        reply = s.recv(4096)
    rid, flags, qdcount, ancount = struct.unpack("!HHHH", reply[:8])
    if rid != query_id or flags & 0x000F:  # another reply, or an error rcode (NXDOMAIN...)
        return []
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(reply, offset) + 4
    addresses = []
    for _ in range(ancount):
        offset = _skip_name(reply, offset)
        rtype, _, _, length = struct.unpack("!HHIH", reply[offset:offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[offset:offset + 4]))
        offset += length
    return addresses


def _skip_name(packet: bytes, offset: int) -> int:
    while True:
        length = packet[offset]
        if length & 0xC0 == 0xC0:  # compression pointer: two bytes, and the name ends
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


# --- the whole host --------------------------------------------------------

def snapshot() -> dict:
    """What the host looks like before the node starts; `up` saves it in the
    state file and `down` restores from it."""
    return {
        "sysctls": read_sysctls(),
        "fixed_paths": {p: os.path.lexists(p) for p in FIXED_PATHS},
        "nft_tables": nft_tables(),
    }


def busy_reasons(bridge: str) -> list[str]:
    """Why the host cannot take a real node now: one is running (or was left
    behind), or a kubelet or kube-proxy of another installation is here. Its
    chains and cgroups would be indistinguishable from ours on teardown."""
    reasons = []
    if link_exists(bridge):
        reasons.append(f"interface {bridge} exists (owner: {link_alias(bridge) or 'unknown'})")
    reasons += [f"iptables chain {c}" for c in kube_chains()[:3]]
    reasons += [f"cgroup {p}" for p in kubepods_cgroups()[:3]]
    return reasons


def our_fixed_entries(state_dir: str, cni_network: str, shim_sockets: list[str]) -> list[str]:
    """What the node wrote in the host-wide directories of FIXED_PATHS: the
    kubelet's device-plugin socket and links to its pod logs, libcni's cached
    results for our network, the sockets of the shims that were killed (a
    shim removes its own when its task is deleted)."""
    entries = [s for s in [*shim_sockets, DEVICE_PLUGIN_SOCKET] if os.path.lexists(s)]
    logs = Path("/var/log/containers")
    if logs.is_dir():
        entries += [str(e) for e in logs.iterdir() if e.is_symlink() and os.readlink(e).startswith(state_dir + "/")]
    entries += [str(e) for e in Path("/var/lib/cni/results").glob(f"{cni_network}-*")]
    return list(dict.fromkeys(entries))  # a pod's containers share their shim


def _prune_empty_dirs(top: str) -> None:
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass  # not empty: someone else's files


def remove_fixed_paths(recorded: dict[str, bool], our_entries: list[str]) -> None:
    for entry in our_entries:
        try:
            os.unlink(entry)
        except OSError:
            pass
    for path, existed in recorded.items():
        if existed:
            continue
        if path == "/var/lib/kubelet":
            # The kubelet's default root directory: only a kubelet writes
            # there, and ours was the only one when it did not exist.
            execute(["rm", "-rf", "--one-file-system", path])
        else:
            _prune_empty_dirs(path)


def fixed_path_leftovers(recorded: dict[str, bool], our_entries: list[str]) -> list[str]:
    found = [f"path {path}" for path, existed in recorded.items() if not existed and os.path.lexists(path)]
    return found + [f"path {e}" for e in our_entries if os.path.lexists(e)]
