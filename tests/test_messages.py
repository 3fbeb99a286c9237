"""The wire format: every message survives MessagePack, and nothing but our dataclasses can come out."""

from __future__ import annotations

import pickle
import subprocess

import msgpack
import pytest

from serve.messages import (
    GenerateRequest, OutputBatch, RequestOutput, SamplingParams, StepPlan, TokenBatch, decode, encode,
)


def test_round_trip_with_nested_dataclasses():
    msgs = [
        GenerateRequest("r1", None, [{"role": "user", "content": "hi"}], None, 5, SamplingParams(8, 0.7, 0.9, 40, 3)),
        StepPlan(3, [0, 1], [0, 9], [0, 2, 3], [5, 6, 7], [10, 11, 12], [0], [SamplingParams(temperature=0.0)], 123),
        TokenBatch(["a", "b"], [b"api-1", b"api-2"], [4, 2], [None, "stop"], [3, 4], [1, 9], 5),
        OutputBatch([RequestOutput("a", "héllo", [4], None, 3, 1)], 7),
    ]
    for msg in msgs:
        assert decode(encode(msg)) == msg


def test_unknown_or_pickled_payloads_are_refused():
    with pytest.raises(ValueError):
        decode(msgpack.packb([999, "x"]))
    with pytest.raises(Exception):
        decode(pickle.dumps({"rid": "x"}))


def test_no_pickle_in_the_package():
    found = subprocess.run(["grep", "-rnE", r"import pickle|cloudpickle|send_pyobj|recv_pyobj", "serve"],
                           capture_output=True, text=True).stdout
    assert found == ""
