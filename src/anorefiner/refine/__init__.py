"""refine"""
