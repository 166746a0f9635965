"""chat-distributed: tensor and pipeline parallel execution for chat-core."""
