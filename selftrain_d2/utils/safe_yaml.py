"""YAML files a user may have downloaded, read with PyYAML's safe loader only.

A tag that would build a Python object (``!!python/object/apply:os.system [...]``) is an ``UnsafeYAMLError``
naming the file, the line and the tag; nothing is constructed. Optionally a mapping that repeats a key is an
error too (PyYAML keeps the last value silently).
"""
import yaml

__all__ = ["UnsafeYAMLError", "DuplicateKeyError", "load_yaml_file"]


class UnsafeYAMLError(ValueError):
    """A YAML tag the safe loader does not construct; the message names the file, line and tag."""


class DuplicateKeyError(ValueError):
    """A YAML mapping that holds one key twice; the message names the file, both lines and the key."""


def _short_tag(tag):
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _where(mark):
    return f"{mark.name}, line {mark.line + 1}"


class _SafeLoader(yaml.SafeLoader):
    def construct_undefined(self, node):
        raise UnsafeYAMLError(
            f"{_where(node.start_mark)}: YAML tag {_short_tag(node.tag)} refused; this file is read with a safe "
            "loader, which builds only plain values (numbers, strings, lists, mappings)"
        )


_SafeLoader.add_constructor(None, _SafeLoader.construct_undefined)


class _UniqueKeySafeLoader(_SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first_line:
                        raise DuplicateKeyError(
                            f"{_where(key_node.start_mark)}: key {key!r} repeats the one on line {first_line[key]}; "
                            "a YAML mapping keeps only the last of them"
                        )
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path, unique_keys=False):
    """The content of the YAML file ``path`` (None when empty), through the safe loader; with
    ``unique_keys`` a mapping that repeats a key raises ``DuplicateKeyError``."""
    with open(path, "r") as f:
        return yaml.load(f, Loader=_UniqueKeySafeLoader if unique_keys else _SafeLoader)
