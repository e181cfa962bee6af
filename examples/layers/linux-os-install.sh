# The OS layer (Linux guests, /bin/sh): the package lists and a few tools.
set -e
apt-get update
apt-get install -y --no-install-recommends less file
