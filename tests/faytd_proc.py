"""The tests start real faytd processes through faytd.launch."""
from faytd.launch import Faytd, fayt_objects, running_faytd, wait_for_socket  # noqa: F401
