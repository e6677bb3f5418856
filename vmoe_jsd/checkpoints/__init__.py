"""Checkpoints: orbax save/restore, integrity, vmoe's format, tree helpers.

checkpointer.py  the training state under WORKDIR/checkpoints/<step>/:
                 periodic (asynchronous) saves, resume from the newest
                 intact step (`Checkpointer`, `CheckpointSpec`); only the
                 params, as numpy (`read_orbax_params`);
integrity.py     the CRC-32C of every saved array and the verdict on a
                 restore (`integrity_summary`, `integrity_problem`);
vmoe_format.py   google-research/vmoe's own format (`.index` +
                 `.data-NNNNN-of-NNNNN`; its msgpack in vmoe_msgpack.py);
tree.py          nested dicts <-> '/'-joined names, tree comparison.
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
