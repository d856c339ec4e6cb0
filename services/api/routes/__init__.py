"""HTTP routes: each translates a request into a call below and the result back into a response."""
