"""The block layer: the chain of nodes (open, resolve, block status, every switch), range locks, and the
device a guest sees."""
