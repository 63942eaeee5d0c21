"""zsad"""
