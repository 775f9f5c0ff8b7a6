"""bptvlm.server"""
