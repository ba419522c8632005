"""The feedback stage: preference data from the AI judge."""
