"""bptvlm.shared"""
