# The OS layer's resume script: nothing to start.
sync
