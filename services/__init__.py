"""The two services: the training worker and the inference API."""
