"""diffpolicy.collection: recording expert demonstrations of a task into a replay buffer
(`collection.collect`).

It joins an environment and its expert (`diffpolicy.envs`) with a store (`diffpolicy.data`), so it
sits above both; neither of them knows the other.
"""
