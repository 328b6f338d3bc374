"""What the controller knows of its runner pods, Jobs and nodes, kept in memory from watches.

The informers (`informer.py`) list each kind once and then follow its watch;
every event lands here. The controller's hot path and its loops read this
index instead of the API: the sweep judges each running row's pod, the scan
classifies pods against the clock, a dying pod's Job and node are looked up,
all without a request. API calls then happen only when something changes.

Objects are kept slim: only the fields the classifier and the readers of
`children.py` use, so thousands of pods stay a few megabytes.

A kind is trusted only once its first listing has completed (`synced`);
before that, and for any name the index does not hold, `IndexedKube` asks the
API (a pod created a moment ago may not have reached the watch yet, and the
sweep must never call such a pod gone). What such a read returns is kept
(`learn`), but never over what the watch has shown since: resourceVersions
are comparable within a resource (KEP-5504), so the index knows the version
up to which it is complete, and a read older than that of an object it does
not hold is of an object deleted since. A listing, likewise, drops only what
is not newer than itself: a pod read after the listing's snapshot was taken
is not one that vanished.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from .builders import LABEL_SUITE

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); nodes have namespace ""

POD, JOB, NODE = "pods", "jobs", "nodes"
KINDS = (POD, JOB, NODE)

_META_KEPT = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences", "creationTimestamp",
              "deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion")


def _slim_meta(meta: Obj) -> Obj:
    return {k: meta[k] for k in _META_KEPT if k in meta}


def slim_pod(pod: Obj) -> Obj:
    """What the classifier reads of a pod: status whole, the node, deadlines and memory limits of the spec."""
    spec = pod.get("spec") or {}
    kept_spec: Obj = {"containers": [{"name": c.get("name"), "resources": c.get("resources") or {}}
                                     for c in spec.get("containers") or []]}
    for key in ("nodeName", "activeDeadlineSeconds"):
        if key in spec:
            kept_spec[key] = spec[key]
    return {"metadata": _slim_meta(pod.get("metadata") or {}), "spec": kept_spec, "status": pod.get("status") or {}}


def slim_job(job: Obj) -> Obj:
    spec = job.get("spec") or {}
    kept_spec = {k: spec[k] for k in ("activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished") if k in spec}
    return {"metadata": _slim_meta(job.get("metadata") or {}), "spec": kept_spec, "status": job.get("status") or {}}


def slim_node(node: Obj) -> Obj:
    status = node.get("status") or {}
    return {"metadata": _slim_meta(node.get("metadata") or {}), "status": {"conditions": status.get("conditions") or []}}


SLIM = {POD: slim_pod, JOB: slim_job, NODE: slim_node}


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def version_of(obj: Obj | None) -> int | None:
    """The object's resourceVersion as a number, or None when it is not one (then nothing is compared)."""
    return parse_version(((obj or {}).get("metadata") or {}).get("resourceVersion"))


def parse_version(text: str | None) -> int | None:
    # KEP-5504's format: a positive decimal integer without leading zeros.
    if not text or not text.isdigit() or text[0] == "0":
        return None
    return int(text)


def _newer(a: int | None, b: int | None) -> bool:
    """a is known to be newer than b (both comparable, a > b)."""
    return a is not None and b is not None and a > b


def _no_newer(a: int | None, b: int | None) -> bool:
    """a is known to be no newer than b (both comparable, a <= b)."""
    return a is not None and b is not None and a <= b


class ClusterIndex:
    """Runner pods, runner Jobs and nodes by (namespace, name); thread-safe, fed by the informers and by reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[Key, Obj]] = {kind: {} for kind in KINDS}
        self._synced: dict[str, bool] = {kind: False for kind in KINDS}
        # Per kind, the version up to which the informer has shown everything (its listing, then its watch):
        # an object not held and no newer than this was deleted by then.
        self._complete_at: dict[str, int | None] = {kind: None for kind in KINDS}

    # ------------------------------------------------------------ fed by the informers

    def apply(self, kind: str, event_type: str, obj: Obj) -> Obj:
        """Record a watch event (ADDED, MODIFIED, DELETED); returns the slim object."""
        slim = SLIM[kind](obj)
        key, version = key_of(slim), version_of(slim)
        with self._lock:
            self._advance(kind, version)
            if event_type == "DELETED":
                self._objects[kind].pop(key, None)
            elif not _newer(version_of(self._objects[kind].get(key)), version):  # a read may be ahead of the watch
                self._objects[kind][key] = slim
        return slim

    def watched_to(self, kind: str, resource_version: str | None) -> None:
        """The watch has shown everything up to this version (a bookmark)."""
        with self._lock:
            self._advance(kind, parse_version(resource_version))

    def replace(self, kind: str, objs: Iterable[Obj], resource_version: str | None = None) -> list[Obj]:
        """A fresh listing (at `resource_version`): becomes the whole of `kind`, but for objects read since
        that are newer than it. Returns what it dropped: deleted while unwatched."""
        fresh = {key_of(s): s for s in map(SLIM[kind], objs)}
        listed_at = parse_version(resource_version)
        with self._lock:
            gone = []
            for key, obj in self._objects[kind].items():
                if key in fresh:
                    continue
                if _newer(version_of(obj), listed_at):
                    fresh[key] = obj  # created after the listing's snapshot: its watch events are still to come
                else:
                    gone.append(obj)
            self._objects[kind] = fresh
            self._synced[kind] = True
            self._complete_at[kind] = listed_at
        return gone

    # ------------------------------------------------------------ fed by reads and writes of the API

    def learn(self, kind: str, obj: Obj) -> Obj:
        """An object as the API answered a read or a create: kept unless the index knows better.

        Returns the slim object either way (it is the API's answer). Not kept
        when the index holds a newer version, or holds none and is complete
        past this one: the object was deleted since (its DELETED event landed
        while this read was in flight), and keeping it would bring it back.
        """
        slim = SLIM[kind](obj)
        key, version = key_of(slim), version_of(slim)
        with self._lock:
            held = self._objects[kind].get(key)
            known_to = version_of(held) if held is not None else self._complete_at[kind]
            if not _no_newer(version, known_to):
                self._objects[kind][key] = slim
        return slim

    def _advance(self, kind: str, version: int | None) -> None:
        if _newer(version, self._complete_at[kind]):
            self._complete_at[kind] = version

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects[kind].pop((namespace, name), None)

    def unsynced(self, kind: str) -> None:
        """The watch broke and a relist is due: absence no longer proves anything."""
        with self._lock:
            self._synced[kind] = False

    # ------------------------------------------------------------ read by the controller

    def synced(self, *kinds: str) -> bool:
        with self._lock:
            return all(self._synced[k] for k in kinds or KINDS)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._objects[kind].get((namespace, name))

    def all(self, kind: str, namespaces: tuple[str, ...] = ()) -> list[Obj]:
        with self._lock:
            objs = list(self._objects[kind].values())
        return [o for o in objs if not namespaces or key_of(o)[0] in namespaces]

    def suite_jobs(self, namespace: str, suite: str) -> list[Obj]:
        return [j for j in self.all(JOB, (namespace,))
                if ((j["metadata"].get("labels") or {}).get(LABEL_SUITE)) == suite]

    def job_pods(self, namespace: str, job_name: str) -> list[Obj]:
        return [p for p in self.all(POD, (namespace,))
                if (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == job_name]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(objs) for kind, objs in self._objects.items()}


class IndexedKube:
    """`Kube` with its reads served from the index: the same interface, so the parts need not know.

    Reads of what the index holds cost no request. A name it does not hold is
    asked of the API (a pod may be newer than the watch), and so is anything
    of a kind not yet synced. Writes go to the API and through to the index,
    so a Job this controller just created is seen by its next reconcile.
    """

    def __init__(self, kube: Any, index: ClusterIndex):
        self.api = kube
        self.index = index

    def __getattr__(self, name: str) -> Any:  # writes and EvalRun reads: the API's own
        return getattr(self.api, name)

    def get_pod(self, namespace: str, name: str) -> Obj | None:
        return self._get(POD, namespace, name, self.api.get_pod)

    def get_job(self, namespace: str, name: str) -> Obj | None:
        return self._get(JOB, namespace, name, self.api.get_job)

    def get_node(self, name: str) -> Obj | None:
        return self._get(NODE, "", name, lambda _ns, n: self.api.get_node(n))

    def runner_pods(self, namespaces: tuple[str, ...]) -> list[Obj]:
        # Always the index, synced or not: the scan asks every second, and while the watch is down
        # a listing would fail the same way; the informer's own relisting delivers every pod anyway.
        return self.index.all(POD, namespaces)

    def suite_jobs(self, namespace: str, suite: str) -> list[Obj]:
        if not self.index.synced(JOB):
            return self.api.suite_jobs(namespace, suite)
        return self.index.suite_jobs(namespace, suite)

    def job_pods(self, namespace: str, job_name: str) -> list[Obj]:
        if not self.index.synced(POD):
            return self.api.job_pods(namespace, job_name)
        return self.index.job_pods(namespace, job_name)

    def create_owned(self, obj: Obj, evalrun: Obj) -> tuple[Obj, bool]:
        created, was_created = self.api.create_owned(obj, evalrun)
        if created.get("kind", obj.get("kind")) == "Job":
            self.index.learn(JOB, created)
        return created, was_created

    def delete_job(self, namespace: str, name: str) -> None:
        self.api.delete_job(namespace, name)
        self.index.forget(JOB, namespace, name)

    def _get(self, kind: str, namespace: str, name: str, fetch: Any) -> Obj | None:
        held = self.index.get(kind, namespace, name)
        if held is not None:
            return held
        fetched = fetch(namespace, name)
        return self.index.learn(kind, fetched) if fetched is not None else None
