"""proto/compat.py: the served API may grow, never change under an old client. Checked on hand-built descriptors
(each kind of break is named; additions and reserved removals pass) and on the committed lock."""

from __future__ import annotations

import json

from google.protobuf import descriptor_pb2 as d

from proto import compat

F = d.FieldDescriptorProto


def api(fields: dict[int, tuple[str, int]], reserved: tuple[list[int], list[str]] = ([], [])) -> compat.Snapshot:
    """One file: message demo.Reply with ``fields`` ({number: (name, type)}) and ``reserved`` (numbers, names),
    enum demo.Color {RED = 0, BLUE = 1}, rpc demo.Svc/Get(Reply) returns (Reply)."""
    f = d.FileDescriptorProto(name="demo.proto", package="demo")
    m = f.message_type.add(name="Reply")
    for number, (name, kind) in fields.items():
        m.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
    for n in reserved[0]:
        m.reserved_range.add(start=n, end=n + 1)
    m.reserved_name.extend(reserved[1])
    e = f.enum_type.add(name="Color")
    e.value.add(name="RED", number=0)
    e.value.add(name="BLUE", number=1)
    f.service.add(name="Svc").method.add(name="Get", input_type=".demo.Reply", output_type=".demo.Reply")
    return compat.snapshot([f])


RELEASED = api({1: ("text", F.TYPE_STRING), 2: ("level", F.TYPE_FLOAT), 3: ("model_name", F.TYPE_STRING)})


def test_adding_fields_is_compatible() -> None:
    grown = api({**{1: ("text", F.TYPE_STRING), 2: ("level", F.TYPE_FLOAT)}, 3: ("model_name", F.TYPE_STRING),
                 4: ("steps", F.TYPE_INT64)})  # fmt: skip
    assert compat.breaks(RELEASED, grown) == []


def test_each_break_is_named() -> None:
    retyped = api({1: ("text", F.TYPE_STRING), 2: ("level", F.TYPE_DOUBLE), 3: ("model_name", F.TYPE_STRING)})
    [problem] = compat.breaks(RELEASED, retyped)
    assert "field demo.Reply #2 changed from ['level', 'TYPE_FLOAT'" in problem and "TYPE_DOUBLE" in problem
    dropped = api({1: ("text", F.TYPE_STRING), 2: ("level", F.TYPE_FLOAT)})
    [problem] = compat.breaks(RELEASED, dropped)
    assert "#3 'model_name' was removed without `reserved 3;`" in problem
    renamed = api({1: ("body", F.TYPE_STRING), 2: ("level", F.TYPE_FLOAT), 3: ("model_name", F.TYPE_STRING)})
    assert len(compat.breaks(RELEASED, renamed)) == 1
    no_rpc = json.loads(json.dumps(RELEASED))
    del no_rpc["methods"]["demo.Svc/Get"]
    assert compat.breaks(RELEASED, no_rpc) == ["rpc demo.Svc/Get was removed"]
    one_color = json.loads(json.dumps(RELEASED))
    del one_color["enums"]["demo.Color"]["values"]["1"]
    assert ["value demo.Color #1 'BLUE'" in p for p in compat.breaks(RELEASED, one_color)] == [True]


def test_a_removal_that_reserves_number_and_name_is_compatible_and_stays_reserved() -> None:
    kept = api({1: ("text", F.TYPE_STRING), 2: ("level", F.TYPE_FLOAT)}, ([3], ["model_name"]))
    assert compat.breaks(RELEASED, kept) == []
    number_only = api({1: ("text", F.TYPE_STRING), 2: ("level", F.TYPE_FLOAT)}, ([3], []))
    assert len(compat.breaks(RELEASED, number_only)) == 1
    # Once released, the reservation itself cannot go: a field could then reuse number 3.
    unreserved = api({1: ("text", F.TYPE_STRING), 2: ("level", F.TYPE_FLOAT)})
    assert compat.breaks(kept, unreserved) == [
        "message demo.Reply no longer reserves numbers 3-3",
        "message demo.Reply no longer reserves the name 'model_name'",
    ]


def test_the_served_api_matches_its_lock() -> None:
    """What `make proto-check` runs: the generated code adds to the lock and nothing else, and the lock is up to
    date (it keeps the pre-release ClassifyResponse fields 2 and 3 reserved)."""
    assert compat.main([]) == 0
    lock = json.loads(compat.LOCK.read_text())
    assert lock["messages"]["seqserve.v1.ClassifyResponse"]["reserved"] == {
        "numbers": [[2, 2], [3, 3]],
        "names": ["model_name", "model_version"],
    }
    assert lock["messages"]["seqserve.v1.QuantileForecast"]["fields"]["1"][:2] == ["level", "TYPE_DOUBLE"]
