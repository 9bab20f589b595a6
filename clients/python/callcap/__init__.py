"""Call Capture client: hand it call records; it stores each exactly once.

    import callcap
    client = callcap.Client("https://calls.example.com", "cc_live_…", spool_dir="/var/spool/callcap")
    client.capture({"company_id": "…", "external_call_id": "CALL-1", "call_status": "completed"})

See :class:`Client` for every setting.
"""

from .client import Client, QueueFull, Rejected, Unavailable
from .record import RecordError
from .spool import SpoolLocked

__all__ = ["Client", "QueueFull", "Rejected", "RecordError", "SpoolLocked", "Unavailable"]
__version__ = "0.1.0"
