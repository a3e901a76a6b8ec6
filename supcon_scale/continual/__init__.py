"""Class-incremental continual learning: streams, reservoir replay memory, SCR and ER, NCM, the field's metrics."""
