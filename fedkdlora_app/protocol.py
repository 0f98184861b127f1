"""What ServerApp and ClientApp say to each other beyond Flower's own keys: one home for both sides.

A leaf module (no imports from the app), so either side can use it without pulling in
the other's code.
"""

from __future__ import annotations

# Client KD: the one-time records that carry the frozen teacher to a node ...
TEACHER_ARRAYS_KEY = "teacher"
TEACHER_CONFIG_KEY = "teacher-config"
# ... and the train-config entry that names it in every train message, so a node finds its copy.
TEACHER_ID_KEY = "client-kd-teacher"
# The code of a ClientApp's error reply when it has neither the shipped teacher nor a local
# copy (Flower's own codes are 0-8): the server ships the teacher again with that node's next
# train message. The reason says so in words, for the results JSON.
NO_TEACHER_ERROR_CODE = 101
NO_TEACHER = "has no client-KD teacher"
# In every ClientApp reply: where the client computed (`devices.placement`), for the results JSON.
PLACEMENT_KEY = "placement"
# Flower's record keys for the model and the round's config (FedAvg's defaults, named here
# so the ClientApp reads what the strategy writes), and the train reply's example count.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
SERVER_ROUND_KEY = "server-round"
NUM_EXAMPLES_KEY = "num_examples"
METRICS_KEY = "metrics"
# Under partial participation the server asks each node once for its partition (a `query`
# message): the reply's metric record, and its one entry (`sampling.PartitionRoster`).
ROLL_CALL_KEY = "roll-call"
PARTITION_ID_KEY = "partition-id"

# The shipped state (`models.shipped_state`, encoded by `wire.to_wire`): PEFT's state-dict
# keys (adapter + head) under the LoRA schemes, the whole `state_dict` under FedAvg. This is
# how PEFT names a LoRA pair's factors in those keys.
LORA_A, LORA_B = ".lora_A.", ".lora_B."
# Under lora-aggregation = "exact", the global state also holds, per adapted module, the residual
# folded into its frozen base weight: a dense matrix, or factors B·A when lora-residual-rank > 0.
RESIDUAL, RESIDUAL_A, RESIDUAL_B = ".residual.", ".residual_A.", ".residual_B."
