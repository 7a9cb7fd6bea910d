"""Transparent interception: the pod's redirect rules and the original destination they hide."""
