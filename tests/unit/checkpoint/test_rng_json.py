"""RNG states survive the JSON round trip: the streams continue exactly."""

import random

import numpy as np
import torch

from megatron.checkpoint.rng import get_rng_state, set_rng_state
from megatron.checkpoint.rng_json import rng_from_json, rng_to_json


def test_round_trip_continues_every_stream(tmp_path):
    import json

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.json"
    path.write_text(json.dumps(rng_to_json(get_rng_state())))
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(rng_from_json(str(path)))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])
