"""bptvlm.client"""
