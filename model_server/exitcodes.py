"""Process exit codes, as named constants.

supervisord.conf mirrors them: codes listed in a program's ``exitcodes`` are
"expected" and, with ``autorestart=unexpected``, not restarted. A process that
cannot boot (bad configuration, a GPU that is not there) exits with
``BOOT_ERROR`` so a broken setting never becomes a restart storm; a worker that
asks to be replaced (``RECYCLE``) exits with an unexpected code and supervisord
starts a fresh one. ``tests/test_supervisord_conf.py`` keeps the two in step.
"""

from typing import Final

OK: Final = 0
# Bad configuration or device: logged with the reason, never restarted.
BOOT_ERROR: Final = 3
# Worker leaves to return memory to the OS (RSS over the recycle mark); restarted.
RECYCLE: Final = 10

# Codes after which supervisord must not restart the process.
EXPECTED: Final = (OK, BOOT_ERROR)
