"""minillm.kv"""
