"""Parse a suite file's YAML, refusing what YAML allows but no suite needs.

PyYAML builds whatever a document describes. Three things it allows would
hurt: nesting so deep that code walking the value (validation, JSON encoding)
runs out of stack; aliases that expand a file of a few hundred bytes into
billions of values (the "billion laughs"); and a mapping key given twice, of
which YAML silently keeps the last. libyaml composes the document into a
graph of nodes, an alias being a second reference to its anchor's node, so
all three are checked on that graph, in time linear in the file, before any
Python value is built.
"""

from __future__ import annotations

from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# libyaml's parser where PyYAML was built with it: about 4x faster on large inline suites (10,000 cases:
# 0.36 s instead of 1.6 s here), and its errors carry the same line and column marks.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Far deeper than any suite or JSON input needs, far shallower than the interpreter's stack allows.
MAX_NESTING_DEPTH = 100
# Values aliases may add to the document beyond those written out: ample for anchors shared by
# thousands of cases, and small next to what a 16 MiB file can hold anyway.
MAX_ALIAS_EXPANSION = 1_000_000
# A path reported for a problem deep inside a value names this many steps, then "...".
MAX_PATH_STEPS = 8

Problem = tuple[str, str]
STR_TAG = "tag:yaml.org,2002:str"
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(ValueError):
    """A document refused before it was built. `problems` holds (field path, message) pairs."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


def load_yaml(text: str) -> Any:
    """The document in `text` as plain data; YamlRefused or yaml.YAMLError if it cannot be used."""
    loader = YAML_LOADER(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        problems = _Graph(root, loader).problems()
        if problems:
            raise YamlRefused(problems)
        return loader.construct_document(root)
    finally:
        loader.dispose()


class _Graph:
    """One pass over the node graph: each distinct collection is visited once, however many aliases name it.

    Scalars, most of a suite, are measured where they stand (one level, one value) and never stored.
    """

    def __init__(self, root: Node, loader: Any):
        self.root = root
        self.loader = loader
        self.height: dict[int, int] = {}  # id(collection) -> levels of nesting at and below it
        self.size: dict[int, int] = {}  # id(collection) -> values it stands for, aliases expanded
        self.written = 1  # values written out in the file, an alias counting as one
        self.duplicates: list[tuple[MappingNode, ScalarNode, str]] = []

    def problems(self) -> list[Problem]:
        recursive = self._measure()
        if recursive is not None:
            return [(self._path_to(recursive), "an alias refers to a value that contains it")]
        problems = [(self._path_to(mapping, f".{key.value}"), said) for mapping, key, said in self.duplicates]
        if self._height(self.root) > MAX_NESTING_DEPTH:
            problems.append((self._descend(self._height, steps=MAX_NESTING_DEPTH),
                             f"nested deeper than {MAX_NESTING_DEPTH} levels"))
        if self._size(self.root) - self.written > MAX_ALIAS_EXPANSION:
            problems.append((self._descend(self._size, above=MAX_ALIAS_EXPANSION),
                             f"aliases expand the suite by more than {MAX_ALIAS_EXPANSION} values"))
        return problems

    def _height(self, node: Node) -> int:
        return 1 if isinstance(node, ScalarNode) else self.height[id(node)]

    def _size(self, node: Node) -> int:
        return 1 if isinstance(node, ScalarNode) else self.size[id(node)]

    def _measure(self) -> Node | None:
        """Fill `height` and `size` bottom-up without recursion; the collection an alias cycle runs through, if any."""
        if isinstance(self.root, ScalarNode):
            return None
        on_path: set[int] = set()
        stack: list[tuple[Node, list[Node] | None]] = [(self.root, None)]
        while stack:
            node, measured_children = stack.pop()
            if measured_children is not None:
                self.height[id(node)] = 1 + max(map(self._height, measured_children), default=0)
                self.size[id(node)] = 1 + sum(map(self._size, measured_children))
                on_path.discard(id(node))
                continue
            if id(node) in self.height:
                continue  # another alias of a collection already measured
            children = _children(node)
            self.written += len(children)
            if isinstance(node, MappingNode):
                self._check_keys(node)
            on_path.add(id(node))
            stack.append((node, children))
            for child in children:
                if isinstance(child, ScalarNode) or id(child) in self.height:
                    continue
                if id(child) in on_path:
                    return child
                stack.append((child, None))
        return None

    def _check_keys(self, mapping: MappingNode) -> None:
        first_line: dict[Any, int] = {}
        for key, _ in mapping.value:
            if not isinstance(key, ScalarNode) or key.tag == MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            value = key.value if key.tag == STR_TAG else self._scalar(key)
            if value in first_line:
                self.duplicates.append((mapping, key, f"given twice (lines {first_line[value]} and {line})"))
            else:
                first_line[value] = line

    def _scalar(self, key: ScalarNode) -> Any:
        """A key's value as YAML reads it, so `1` and `0x1` are one key (and `1` and "1" two)."""
        try:
            value = self.loader.construct_object(key)
            hash(value)
        except (yaml.YAMLError, TypeError):
            return (key.tag, key.value)
        return value

    def _descend(self, measure: Callable[[Node], int], steps: int | None = None, above: int | None = None) -> str:
        """The path down the largest child: `steps` levels, or while a child still measures more than `above`."""
        node, labels = self.root, []
        while steps is None or len(labels) < steps:
            children = _labelled_children(node)
            if not children:
                break
            label, child = max(children, key=lambda pair: measure(pair[1]))
            if above is not None and measure(child) <= above:
                break
            node = child
            labels.append(label)
        return _format(labels)

    def _path_to(self, target: Node, then: str = "") -> str:
        """The first path from the root to `target` (searched only to report a problem)."""
        seen: set[int] = set()
        stack: list[tuple[Node, list[str]]] = [(self.root, [])]
        while stack:
            node, labels = stack.pop()
            if node is target:
                return _format(labels + [then])
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend((child, labels + [label]) for label, child in reversed(_labelled_children(node)))
        return _format([then])


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return node.value
    if isinstance(node, MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _labelled_children(node: Node) -> list[tuple[str, Node]]:
    """(label, child): `.key` for a mapping's values (its keys too, labelled as the mapping), `[i]` for items."""
    if isinstance(node, SequenceNode):
        return [(_item_label(index, item), item) for index, item in enumerate(node.value)]
    if isinstance(node, MappingNode):
        out: list[tuple[str, Node]] = []
        for key, value in node.value:
            out.append(("", key))
            out.append((f".{key.value}" if isinstance(key, ScalarNode) else ".?", value))
        return out
    return []


def _item_label(index: int, item: Node) -> str:
    """`[2 (id=add)]` for a case with an id, as the suite loader names cases; else `[2]`."""
    if isinstance(item, MappingNode):
        for key, value in item.value:
            if isinstance(key, ScalarNode) and key.value == "id" and isinstance(value, ScalarNode):
                return f"[{index} (id={value.value})]"
    return f"[{index}]"


def _format(labels: list[str]) -> str:
    """The field a problem is in: trailing list positions dropped (`input`, not `input[0][0][0]`), long
    paths cut short."""
    labels = [label for label in labels if label]
    while labels and labels[-1].startswith("["):
        labels.pop()
    shown = "".join(labels[:MAX_PATH_STEPS]) + ("..." if len(labels) > MAX_PATH_STEPS else "")
    return shown.removeprefix(".")
