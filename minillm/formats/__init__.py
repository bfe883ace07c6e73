"""minillm.formats"""
