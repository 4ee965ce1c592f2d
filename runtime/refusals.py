"""
How the nanochat backend words the errors a client must act on. A decoupled stream's error carries a
message but no code, so these prefixes are the contract between the backend and its clients (the BFF
answers INVALID with 400 and the other two with 503). No imports: the BFF reads this without torch.
"""

INVALID = "invalid request: "  # the client's fault: bad input, a prompt longer than the context
QUEUE_FULL = "queue full: "  # every slot busy and the queue full; try again later
SHUTTING_DOWN = "model is shutting down"  # the instance is being unloaded; try again (another model)
