"""mergekit 0.1.5's named chat templates (texts copied from its _data/chat_templates), for ``chat_template: NAME``."""
