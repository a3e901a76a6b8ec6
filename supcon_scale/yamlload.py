"""The YAML reader of configs: PyYAML's SafeLoader with the rules a config needs (config.py parses with it).

- YAML 1.2 core numbers, not YAML 1.1's: `1:30` is a string (1.1: the base-60 integer 90), `012` is 12 (1.1: octal
  10), `1e-4` a float (PyYAML wants a dot).
- Duplicate keys refused, naming the key and both lines: a repeated section would silently replace the first.
- Aliases bounded by what they add (a "billion laughs" bomb is a few hundred bytes), not by the document's size.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_YAML_NODES = 10_000  # nodes that aliases may add to one YAML document (recipes use none)


# YAML 1.2 core schema numbers (yaml.org/spec/1.2.2, 10.3.2): PyYAML reads YAML 1.1, where `1:30` is the base-60
# integer 90 and `012` the octal 10; here they are a string (refused for a number key) and 12.
_INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_12 = re.compile(
    r"^(?:[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN))$"
)


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers that refuses duplicate keys (a repeated section would silently win) and
    documents whose aliases add more than MAX_YAML_NODES nodes (or refer into themselves)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, {}, set(), [0])
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        sign = -1 if text.startswith("-") else 1
        body = text.lstrip("+-")
        if body.startswith(("0o", "0x")):
            return sign * int(body[2:], 8 if body[1] == "o" else 16)
        return sign * int(body, 10)  # `012` is 12 in YAML 1.2, not octal

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_12, list("-+0123456789"))
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)


class YAMLTooLarge(yaml.YAMLError):
    pass


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int], aliased: list[int]) -> int:
    """Nodes under `node` with every alias expanded; shared nodes are sized once but counted each time used, and
    `aliased[0]` counts what the aliases add: a large document without aliases is no bomb (its bytes are bounded
    by the reader), a small one whose aliases add MAX_YAML_NODES nodes is."""
    if id(node) in sizes:
        aliased[0] += sizes[id(node)]
        if aliased[0] > MAX_YAML_NODES:
            raise YAMLTooLarge(f"its aliases expand to more than {MAX_YAML_NODES} values")
        return sizes[id(node)]
    if id(node) in open_:
        raise YAMLTooLarge("an alias refers to a node that contains it")
    open_.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, open_, aliased)
    open_.discard(id(node))
    sizes[id(node)] = size
    return size
