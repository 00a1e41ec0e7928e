"""What every stage runs inside: preemption, manifests and resource errors (faults.py), exit codes and one-line
errors (exits.py), and the W&B run with its local record (tracking.py)."""
