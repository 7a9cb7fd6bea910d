"""The policy layers between the server and the forwarder: timeout, retry, balance, breaker.

One module per concern, each with a frozen config, the layer and its error type; `stack` is the
one place that composes them for a service (see its docstring for the order and why).
"""
