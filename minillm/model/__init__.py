"""minillm.model"""
