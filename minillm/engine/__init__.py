"""minillm.engine"""
