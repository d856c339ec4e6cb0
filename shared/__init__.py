"""Code both services need: the contract between training and serving."""
