# The application layer: AbiWord from its Debian package (the package lists
# come from the OS layer).
set -e
apt-get install -y abiword
