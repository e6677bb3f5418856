"""Checkpoints: our orbax ones (checkpointer.py), the CRC-32C of every saved
array (integrity.py), google-research/vmoe's format (vmoe_format.py,
vmoe_msgpack.py), nested dicts <-> '/'-joined names (tree.py).
"""

from vmoe_jsd.checkpoints.checkpointer import (  # noqa: F401 - re-exported
  Checkpointer,
  CheckpointSpec,
  NoUsableCheckpointError,
  abstract_like,
  find_orbax_state_dir,
  read_orbax_params,
)
from vmoe_jsd.checkpoints.integrity import (  # noqa: F401 - re-exported
  INTEGRITY_ITEM,
  IntegrityError,
  crc32c_combine,
  integrity_problem,
  integrity_record,
  integrity_summary,
)
from vmoe_jsd.checkpoints.tree import (  # noqa: F401 - re-exported
  flatten_tree,
  match_tree,
  read_npz_tree,
  unflatten_tree,
)
from vmoe_jsd.checkpoints.vmoe_format import (  # noqa: F401 - re-exported
  read_vmoe_checkpoint,
  read_vmoe_index,
  write_vmoe_checkpoint,
)
