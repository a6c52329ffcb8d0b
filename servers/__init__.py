"""The reference servers: python -m servers.NAME in a checkout, and
python -m fayt_servers.NAME where fayt-portals is installed (the same
folder under another name).  They import each other relatively, so that
either name works."""
