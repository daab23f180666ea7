"""seam"""
