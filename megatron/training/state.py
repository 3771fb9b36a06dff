"""The counters a run carries from iteration to iteration and through checkpoints.

Everything else that changes during training (the LR, r_t, the data position) is derived from these,
which is what makes resume exact.
"""

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    iteration: int = 0  # completed iterations; iteration t (0-based) is the (t+1)-th
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    consumed_layer_tokens: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    train_time_ms: int = 0  # wall-clock of the training steps alone (no evaluation, no saving)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for key, value in d.items():
            if hasattr(self, key):
                setattr(self, key, int(value))
