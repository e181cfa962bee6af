# AbiWord without a display: its command plugin reads commands from stdin
# (a FIFO kept open), waiting for the user.
mkfifo /run/abiword.in
(tail -f /dev/null > /run/abiword.in &)
nohup abiword --plugin=AbiCommand < /run/abiword.in > /run/abiword.log 2>&1 &
