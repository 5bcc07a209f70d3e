# The preference (DPO) record shape registers itself with shared.records on import: imported
# here, it is in place wherever records are read.
from shared import preference as _preference  # noqa: F401
