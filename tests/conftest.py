import os
import sys

# tests/ is not a package: make its helper modules importable whatever pytest's import mode.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from s3_server import s3_server  # noqa: E402,F401  (session fixture: a real SeaweedFS S3 endpoint)
from ssh_cluster import ssh_cluster  # noqa: E402,F401  (session fixture: a two-host sshd on 127.0.0.1/.2)
