"""The training core: one update of the policy (trainer), the outer loop (loop), batching, log-probs, metrics,
checkpoints and the multi-rank protocol. Imports algo/, rollout/ (for the Trajectory hand-off) and engine/ protocols;
never the application layer (app/)."""
