"""uctr_batch.records keeps the dataclass contract its callers relied on (the policy model,
the image records, the job context): checked against real dataclasses side by side."""

import copy
import dataclasses
import pickle

import pytest

from uctr_batch.image.manifest import ImageRecord, Layer
from uctr_batch.policy.model import EnvRules, NodePolicy, builtin_body, merge_body
from uctr_batch.records import Frozen, Record, plain, replace


class Point(Frozen):
    __slots__ = ("x", "y", "tags", "note")
    _DEFAULTS = {"y": 0, "tags": list, "note": None}
    _NOT_COMPARED = ("note",)


@dataclasses.dataclass(frozen=True)
class DPoint:
    x: int
    y: int = 0
    tags: list = dataclasses.field(default_factory=list)
    note: object = dataclasses.field(default=None, compare=False, hash=False)


class Tally(Record):
    __slots__ = ("count", "seen")
    _DEFAULTS = {"count": 0, "seen": list}


def test_construction_by_position_or_keyword_with_defaults():
    assert Point(1) == Point(x=1) == Point(1, 0, []) == Point(1, tags=[], y=0)
    assert Point(1).tags is not Point(1).tags  # a factory: a new list each time
    with pytest.raises(TypeError):
        Point()
    with pytest.raises(TypeError):
        Point(1, 2, [], None, "extra")
    with pytest.raises(TypeError):
        Point(1, x=2)
    with pytest.raises(TypeError):
        Point(1, z=2)


def test_equality_repr_and_hash_as_a_dataclass():
    expected = repr(DPoint(1, 2, ["a"], "n")).replace("DPoint", "Point")
    assert repr(Point(1, 2, ["a"], "n")) == expected
    assert Point(1, note="a") == Point(1, note="b")  # not compared, as compare=False
    assert Point(1) != Point(2) and Point(1) != DPoint(1)
    assert hash(Point(1, 2, ())) == hash(Point(1, 2, (), "other note"))
    with pytest.raises(TypeError):
        hash(Point(1, 2, []))  # a list field: unhashable, as the dataclass
    with pytest.raises(TypeError):
        hash(Tally())  # mutable: no hash


def test_frozen_and_mutable():
    point = Point(1)
    with pytest.raises(AttributeError):
        point.x = 2
    with pytest.raises(AttributeError):
        del point.x
    tally = Tally()
    tally.count += 1
    tally.seen.append("a")
    assert tally == Tally(1, ["a"])


def test_replace_plain_copy_and_pickle():
    point = Point(1, 2, [Point(3)])
    assert replace(point, y=5) == Point(1, 5, [Point(3)])
    with pytest.raises(TypeError):
        replace(point, z=1)
    assert plain(point) == {"x": 1, "y": 2, "tags": [{"x": 3, "y": 0, "tags": [], "note": None}],
                            "note": None}
    deep = copy.deepcopy(point)
    assert deep == point and deep.tags is not point.tags
    assert pickle.loads(pickle.dumps(point)) == point


def test_node_policy_to_dict_is_what_asdict_gave():
    body = merge_body(builtin_body(), {"env": {"set": {"A": "1"}}})
    policy = NodePolicy.from_body(body, {"p": {"family": "openmpi", "libs": ["libmpi.so"]}},
                                  node="n1", partition=None, features=(), class_name=None,
                                  reason="defaults")
    data = policy.to_dict()
    assert data["env"]["set"] == {"A": "1"} and data["mpi_profiles"]["p"]["family"] == "openmpi"
    assert "name" not in data["mpi_profiles"]["p"] and isinstance(data["modes"], tuple)
    assert NodePolicy.from_dict(data) == policy
    assert policy.mpi_profiles["p"].env == EnvRules()


def test_image_record_config_is_not_compared():
    layers = (Layer("sha256:" + "a" * 64, "application/vnd.oci.image.layer.v1.tar+gzip", 3),)
    one = ImageRecord("r", "sha256:" + "b" * 64, "sha256:" + "c" * 64, layers, config={"a": 1})
    assert one == replace(one, config={}) and hash(one) == hash(replace(one, config={}))
    assert one != replace(one, reference="s")
